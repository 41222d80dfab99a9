from falcon_h1.model.config import FalconH1Config, config_from_hf, config_to_hf

__all__ = ["FalconH1Config", "config_from_hf", "config_to_hf"]
