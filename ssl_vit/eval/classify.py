"""Top-1/top-5 of a classifier (a fine-tuned ViT with its head) on evaluation shards: every sample once across ranks."""
import torch
from torch import nn
from tqdm import tqdm

from ssl_vit.data.loader import StreamLoader
from ssl_vit.data.stream import ShardStream
from ssl_vit.errors import SslVitError
from ssl_vit.eval.features import eval_transform


@torch.no_grad()
def evaluate_classifier(model: nn.Module, source, accelerator, *, image_size: int, resize: int | None = None,
                        batch_size: int = 128, num_workers: int = 2, progress: bool = True) -> dict:
    """{'top1', 'top5' (percent), 'num', 'skipped'} over all processes (collective under accelerate)."""
    acc = accelerator
    stream = ShardStream(source, eval_transform(image_size, resize), batch_size, mode="eval",
                         rank=acc.process_index, world_size=acc.num_processes, num_workers=num_workers)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=acc.device)  # correct@1, correct@5, seen
    loader = StreamLoader(stream, device=acc.device)
    bar = tqdm(desc="evaluate", unit="img", disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    with acc.autocast():
        for batch in loader:
            labels = batch["label"]
            if (labels < 0).any():
                key = batch["key"][int((labels < 0).nonzero()[0])]
                raise SslVitError(f"evaluation shards {source}: sample {key} has no label (write the shards from a "
                                  "labelled ImageFolder tree or a path,label list)")
            logits = model(batch["views"][0]).float()  # [B, C]
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, 5]
            hits = top5 == labels[:, None]
            counts += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(labels)],
                                   dtype=torch.float64, device=acc.device)
            bar.update(len(labels) * acc.num_processes)
    bar.close()
    model.train(was_training)
    _, skipped = loader.skip_counts()
    counts = acc.reduce(counts, reduction="sum")
    skipped = int(acc.reduce(torch.tensor(skipped, device=acc.device), reduction="sum").item())
    if counts[2] == 0:
        raise SslVitError(f"empty evaluation set: no readable samples in {source}")
    return {"top1": round(100 * counts[0].item() / counts[2].item(), 3),
            "top5": round(100 * counts[1].item() / counts[2].item(), 3), "num": int(counts[2].item()),
            "skipped": skipped}
