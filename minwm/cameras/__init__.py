"""Cameras: the one camera type, importers/exporters, the action language, Plücker ray maps."""

from minwm.cameras.actions import ActionConfig, actions_to_cameras, cameras_to_actions, format_actions, parse_actions
from minwm.cameras.camera import Cameras, crop_intrinsics, invert_rigid, latent_cameras, resize_crop_intrinsics
from minwm.cameras.formats import detect_format, load_cameras, save_cameras
from minwm.cameras.plucker import plucker_rays

__all__ = [
    "ActionConfig", "Cameras", "actions_to_cameras", "cameras_to_actions", "crop_intrinsics", "detect_format",
    "format_actions", "invert_rigid", "latent_cameras", "load_cameras", "parse_actions", "plucker_rays",
    "resize_crop_intrinsics", "save_cameras",
]
