"""Explanations: class activation maps (one template, several methods) and their quality measures.

``explanation_quality`` and friends were the flat ``qrobust.explain`` module of 0.1 and stay importable.
"""
from qrobust.explain.cam import CAM_METHODS, CamMethod, compute_cams, register_cam_method
from qrobust.explain.quality import box_iou, deletion_insertion, explanation_quality, wsol_box, wsol_iou

__all__ = ["CAM_METHODS", "CamMethod", "box_iou", "compute_cams", "deletion_insertion", "explanation_quality",
           "register_cam_method", "wsol_box", "wsol_iou"]
