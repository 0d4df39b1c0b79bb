"""``scail-win pose``: SCAIL-Pose's single-person pipeline without its second environment.

Driving video -> YOLOX + DWPose (onnxruntime) -> NLF 3D joints (TorchScript)
-> coloured limb cylinders rendered in PyTorch with the 2D face and hands
drawn over -> ``rendered.mp4``, ready for ``scail-win sample``.
"""
