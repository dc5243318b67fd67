"""Masked autoencoder pretraining around a timm ViT (He et al. 2021, "Masked Autoencoders Are Scalable Vision
Learners"): the encoder is the timm model itself, run on the visible patches only; the decoder is `MAEDecoder`."""
from dataclasses import replace

import torch
from torch import nn

from ssl_vit.method_settings import MAEConfig, num_visible
from ssl_vit.errors import SslVitError
from ssl_vit.losses.mae_loss import mae_loss, patch_stats, patchify, unpatchify
from ssl_vit.methods.base import BuildContext, Method
from ssl_vit.models.backbone import BackboneSpec, backbone_family, create_backbone, patch_size_of
from ssl_vit.models.mae_decoder import MAEDecoder, init_mae_weights
from ssl_vit.models.masking import random_masking
from ssl_vit.models.pos_embed import sincos_2d
from ssl_vit.seeding import step_generator


# Why MAE refuses the other families (it would need SimMIM-style mask tokens instead of dropping patches).
NOT_MAE_ENCODERS = {
    "swin": "MAE's encoder sees only the visible patches, and a Swin's shifted windows and patch merging need the "
            "whole patch grid (SimMIM-style masking would be needed); train it with dino or supervised",
    "hybrid": "MAE's encoder sees only the visible patches, and a hybrid's ResNet stem mixes neighbouring patches "
              "before any can be dropped (masked pixels would leak); train it with dino or supervised"}


def check_mae_encoder(encoder: nn.Module, name: str) -> None:
    """MAE's encoder adds one position embedding per patch plus one for a single CLS token (Sec. 3, Appendix A.1)."""
    if getattr(encoder, "cls_token", None) is None or getattr(encoder, "pos_embed", None) is None:
        raise SslVitError(f"model.name: MAE needs a ViT with a class token and absolute position embeddings; "
                          f"{name!r} lacks one")
    if encoder.num_prefix_tokens != 1 or getattr(encoder, "no_embed_class", False):
        raise SslVitError(f"model.name: MAE needs a ViT whose only prefix token is CLS, with a CLS position "
                          f"embedding; {name!r} has {encoder.num_prefix_tokens} prefix tokens")


class MAE(Method):
    """MAE (He et al. 2021, Sec. 3): mask a random 75 % of patches, encode the rest, reconstruct the pixels of the
    masked patches; loss = MSE on masked patches of per-patch normalised pixels (Sec. 3, Table 1c).

    The encoder's `pos_embed` is replaced by fixed 2-D sin-cos embeddings with a zero CLS row, as in the paper's
    code; `backbone()` is therefore a plain timm ViT that runs `forward_features` on whole images.
    Masks are drawn from a generator seeded with the `seed` the caller passes to `forward` (the trainer's: from run
    seed, step, rank and micro-batch): the model holds no random state, so a resumed run draws the same masks.
    """

    def __init__(self, backbone: BackboneSpec, settings: MAEConfig | None = None, **changes):
        """`settings` (the recipe's `mae` section; its defaults when None), with `changes` to single fields."""
        super().__init__()
        s = replace(settings or MAEConfig(), **changes)
        s.check(backbone)
        family = backbone_family(backbone.name)
        if family in NOT_MAE_ENCODERS:
            raise SslVitError(f"model.name: {backbone.name!r} is a {family} backbone: {NOT_MAE_ENCODERS[family]}")
        self.encoder = create_backbone(backbone, num_classes=0)
        check_mae_encoder(self.encoder, backbone.name)
        self.grid = tuple(self.encoder.patch_embed.grid_size)
        self.patch_size = patch_size_of(self.encoder)
        self.img_size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        length = self.grid[0] * self.grid[1]
        self.mask_ratio, self.norm_pix_loss = s.mask_ratio, s.norm_pix_loss
        self.effective_mask_ratio = 1.0 - num_visible(length, s.mask_ratio) / length
        self.in_chans = self.encoder.patch_embed.proj.in_channels
        self.decoder = MAEDecoder(self.grid, self.patch_size, self.encoder.embed_dim, s.decoder_dim, s.decoder_depth,
                                  s.decoder_heads, in_chans=self.in_chans)
        self._init_encoder()

    @classmethod
    def from_recipe(cls, recipe, spec: BackboneSpec, context: BuildContext) -> "MAE":
        return cls(spec, recipe.mae)

    @torch.no_grad()
    def _init_encoder(self) -> None:
        enc = self.encoder
        enc.pos_embed.copy_(sincos_2d(enc.embed_dim, self.grid, cls_token=True).unsqueeze(0))  # [1, 1 + L, D]
        enc.pos_embed.requires_grad_(False)
        enc.apply(init_mae_weights)
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on flattened patches
        nn.init.normal_(enc.cls_token, std=0.02)

    def _check_images(self, imgs: torch.Tensor) -> None:
        if imgs.ndim != 4 or tuple(imgs.shape[-2:]) != self.img_size or imgs.shape[1] != self.in_chans:
            raise SslVitError(f"views[0]: MAE expects images [B, {self.in_chans}, {self.img_size[0]}, "
                              f"{self.img_size[1]}] (model.img_size), got {list(imgs.shape)}")

    def forward_encoder(self, imgs: torch.Tensor, generator: torch.Generator):
        """Visible patches + CLS through the timm blocks → (latent [N, 1 + K, D], mask [N, L], ids_restore [N, L])."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # [N, L, D] (or [N, h, w, D] with dynamic_img_size)
        x = x.flatten(1, -2) if x.ndim == 4 else x
        x = x + enc.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, self.mask_ratio, generator)  # [N, K, D]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1)  # [N, 1 + K, D]
        x = enc.norm(enc.blocks(enc.norm_pre(enc.pos_drop(x))))
        return x, mask, ids_restore

    def forward(self, batch: dict, sched: dict, seed: int) -> dict:
        imgs = batch["views"][0]
        self._check_images(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, torch.Generator().manual_seed(seed))
        pred = self.decoder(latent, ids_restore)  # [N, L, p*p*C]
        loss = mae_loss(pred, patchify(imgs, self.patch_size), mask, self.norm_pix_loss)
        return {"loss": loss, "mask_ratio": self.effective_mask_ratio}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Reconstructions for a figure: (pred_images, mask_images), both [N, C, H, W] in the input's space.

        With norm_pix_loss the prediction is un-normalised per patch with the target patch's own mean/std.
        mask_images is 1 on removed patches; `images * (1 - m) + pred * m` pastes the visible pixels back.
        """
        self._check_images(images)
        generator = generator if generator is not None else step_generator(0)
        was_training = self.training
        self.eval()
        try:
            latent, mask, ids_restore = self.forward_encoder(images, generator)
            pred = self.decoder(latent, ids_restore).float()  # [N, L, p*p*C]
        finally:
            self.train(was_training)
        if self.norm_pix_loss:
            mean, std = patch_stats(patchify(images, self.patch_size))
            pred = pred * std + mean
        mask_patches = mask.float().unsqueeze(-1).expand_as(pred)  # [N, L, p*p*C]
        return (unpatchify(pred, self.patch_size, self.grid, self.in_chans),
                unpatchify(mask_patches, self.patch_size, self.grid, self.in_chans))
