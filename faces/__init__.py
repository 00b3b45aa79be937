"""Photo inference, Gradio-free, so that tests and users can call it from Python:

    from faces import FaceAnalyzer
    analyzer = FaceAnalyzer("model")
    result = analyzer.analyze("group.jpg")
    for face in result.faces: print(face.box, face.label)

detection (RetinaFace) -> search (every face in a photo) -> alignment (UTKFace framing) -> analysis (the model)
-> drawing and tracking.
"""

from .alignment import CHIP_SIZE, align_face
from .analysis import DEFAULT_MODEL, RUNTIMES, FaceAnalyzer, FaceRecord, PhotoResult, native_bfloat16, resolve_dtype
from .detection import Detection, RetinaFaceDetector, box_iou
from .drawing import FACE_COLOURS, annotate, face_colour, face_label
from .onnx_model import OnnxAgeGenderModel
from .search import detect_in_photo, reading_order
from .tracking import FaceTracker

__all__ = [
    "CHIP_SIZE",
    "DEFAULT_MODEL",
    "FACE_COLOURS",
    "Detection",
    "FaceAnalyzer",
    "FaceRecord",
    "FaceTracker",
    "OnnxAgeGenderModel",
    "RUNTIMES",
    "PhotoResult",
    "RetinaFaceDetector",
    "align_face",
    "annotate",
    "box_iou",
    "detect_in_photo",
    "face_colour",
    "face_label",
    "native_bfloat16",
    "reading_order",
    "resolve_dtype",
]
