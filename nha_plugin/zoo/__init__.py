"""The bundled planted-concept models (``scenes-rn``: a CLIP-ResNet; ``scenes-vit``: a CLIP-ViT), their configs,
weights and model cards, and the seeded scripts that trained them (:mod:`.train_scenes_rn`, :mod:`.train_scenes_vit`).

    from nha_plugin.zoo import load_zoo_model
    model, preprocess, tokenizer = load_zoo_model("scenes-rn")      # offline; = nha_plugin.load_clip("scenes-rn")
"""
from .bundled import (MODELS, ZOO_DIR, build_model, config_path, images_to_tensor, load_state_dict_file,
                      load_zoo_model, preprocess_mean_std, weights_path, zoo_config)

__all__ = ["MODELS", "ZOO_DIR", "build_model", "config_path", "images_to_tensor", "load_state_dict_file",
           "load_zoo_model", "preprocess_mean_std", "weights_path", "zoo_config"]
