"""ssl_vit: self-supervised pretraining (MAE, DINO) of Vision Transformers on WebDataset shards."""
__version__ = "0.1.0"
