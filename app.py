"""Age and gender estimation: a Gradio app that finds every face in a photo or a webcam stream and labels it.

    python app.py                       # the shipped model in model/
    python app.py --model runs/small    # another folder or a Hub id (or set AGE_GENDER_MODEL)

The port follows GRADIO_SERVER_PORT (default 7860). All face logic lives in faces.py.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import io
import logging
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from faces import DEFAULT_MODEL, FaceAnalyzer, FaceRecord, FaceTracker, PhotoResult, annotate
from modeling import InvalidImageError

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_FILE_SIZE = "10mb"
# Annotated photos go out as JPEG at this quality: 1-6 ms to encode a 600x600 photo against 85 ms for PNG
# (as much again as the whole analysis), an eighth of the bytes, and labels that stay sharp.
OUTPUT_QUALITY = 92
# Uploads and results are deleted from gradio's cache every hour once two hours old, so that a long-running
# server (a Space) does not fill its disk with every photo it was ever sent.
CACHE_LIFETIME = (3600, 7200)
TABLE_COLUMNS = ["face", "age", "interval", "gender", "confidence"]
logger = logging.getLogger("age_gender_app")


class PhotoInput(gr.Image):
    """gr.Image whose upload errors (not an image, a decompression bomb) reach the user as a clear message
    instead of a server error."""

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Image.DecompressionBombError as error:
            raise gr.Error(f"This image is too large to decode safely ({error}).") from error
        except Exception as error:
            raise gr.Error("This file is not an image that can be read (supported: JPEG, PNG, WebP, GIF, BMP, TIFF).") from error


class AnnotatedImage(gr.Image):
    """gr.Image output whose cached file is written under a temporary name and renamed into place.

    Gradio names a cached output after a hash of its bytes, so two users who send the same photo share one
    file; gradio 6.31 rewrites that file in place, and a user still downloading it got a truncated image
    ("Too little data for declared Content-Length": 4 of 309 requests under benchmarks/app_load.py)."""

    is_template = True

    def postprocess(self, value):
        if isinstance(value, Image.Image):
            value = cache_image_atomically(value, self.GRADIO_CACHE, self.format)
        return super().postprocess(value)


def cache_image_atomically(image: Image.Image, cache_dir: str, image_format: str) -> str:
    """`image` in the cache under a name made from its bytes, never visible half-written: a reader sees no
    file or the whole file."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, quality=OUTPUT_QUALITY)
    data = buffer.getvalue()
    folder = Path(cache_dir) / hashlib.sha256(data).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"image.{image_format}"
    if path.exists():
        os.utime(path)  # handed out again: restart its age, so that CACHE_LIFETIME counts from this use
    else:
        handle, staging = tempfile.mkstemp(dir=folder, prefix=".image.")
        with os.fdopen(handle, "wb") as staging_file:
            staging_file.write(data)
        os.replace(staging, path)
    return str(path.resolve())


def faces_table(faces: list[FaceRecord]) -> pd.DataFrame:
    rows = [
        [i + 1, round(f.age, 1), f"{f.age_interval[0]}-{f.age_interval[1]}", f.gender, round(f.gender_score, 3)]
        for i, f in enumerate(faces)
    ]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def age_distribution_frame(faces: list[FaceRecord], min_age: int) -> pd.DataFrame:
    """Long-form age distributions of up to 8 faces, for the line plot."""
    frames = [
        pd.DataFrame({"age": np.arange(min_age, min_age + len(f.age_distribution)), "probability": f.age_distribution, "face": f"face {i + 1}"})
        for i, f in enumerate(faces[:8])
    ]
    return pd.concat(frames) if frames else pd.DataFrame({"age": [], "probability": [], "face": []})


def summary_message(result: PhotoResult, seconds: float) -> str:
    if result.whole_image is not None:
        w = result.whole_image
        return (
            f"**No face found.** Read as one face crop, the whole photo gives {w.gender} {w.age:.0f} "
            f"({w.age_interval[0]}-{w.age_interval[1]}); tick *This photo is already a face crop* if it is one."
        )
    downscaled = f" (downscaled by {result.scale:.2f} for detection)" if result.scale < 1 else ""
    return f"Found {len(result.faces)} face{'s' if len(result.faces) != 1 else ''} in {seconds * 1000:.0f} ms{downscaled}."


def predict_photo(analyzer: FaceAnalyzer, image_path: str | None, is_face_crop: bool = False):
    """Detect, align and label every face. Returns the annotated photo, a table, the age distributions, the
    faces as JSON (box, age, interval, gender, confidence) and a message; bad input raises gr.Error."""
    if image_path is None:
        raise gr.Error("Upload a photo first.")
    started = time.perf_counter()
    try:
        result = analyzer.analyze(image_path, assume_face_crop=is_face_crop)
    except InvalidImageError as error:
        raise gr.Error(str(error).replace(repr(str(image_path)), "the upload")) from error
    except Exception as error:
        logger.exception("failed on an upload")
        raise gr.Error(f"Could not process this image ({type(error).__name__}).") from error
    shown = result.faces or ([result.whole_image] if result.whole_image else [])
    payload = {
        "faces": [face.to_json() for face in result.faces],
        "whole_image": result.whole_image.to_json() if result.whole_image else None,
        "image_size": list(result.image.size),
        "scale": result.scale,
    }
    return (
        annotate(result.image, result.faces),
        faces_table(shown),
        age_distribution_frame(shown, analyzer.model.config.min_age),
        payload,
        summary_message(result, time.perf_counter() - started),
    )


def stream_webcam(analyzer: FaceAnalyzer, frame: np.ndarray | None, tracker: FaceTracker | None):
    """Label a webcam frame, smoothing ages and genders across frames; also returns the labels as text."""
    tracker = tracker or FaceTracker()
    if frame is None:
        return None, "", tracker
    result = analyzer.analyze(frame)
    faces = tracker.update(result.faces, analyzer.model.config)
    labels = ", ".join(face.label for face in faces) or "no face in view"
    return annotate(result.image, faces), labels, tracker


def build_demo(analyzer: FaceAnalyzer) -> gr.Blocks:
    """The app's interface around one loaded analyzer."""

    def on_photo(image_path: str | None, is_face_crop: bool = False):
        return predict_photo(analyzer, image_path, is_face_crop)

    def on_frame(frame: np.ndarray | None, tracker: FaceTracker | None):
        return stream_webcam(analyzer, frame, tracker)

    with gr.Blocks(title="Age and gender estimation", delete_cache=CACHE_LIFETIME) as demo:
        gr.Markdown(
            "# Age and gender estimation\nFinds every face, aligns it the way the model was trained, and labels it "
            "with an age, an interval meant to hold 80% of true ages, and a gender. Estimates from appearance "
            "only: not for decisions about people."
        )
        with gr.Tab("Photo"):
            with gr.Row():
                with gr.Column():
                    photo = PhotoInput(label="Photo", type="filepath", sources=["upload", "clipboard"], height=420)
                    is_crop = gr.Checkbox(label="This photo is already a face crop (skip detection)")
                    run = gr.Button("Estimate", variant="primary")
                with gr.Column():
                    annotated = AnnotatedImage(label="Faces", format="jpeg", type="pil", height=420, buttons=["download"])
                    message = gr.Markdown()
            table = gr.Dataframe(label="One row per face", headers=TABLE_COLUMNS, interactive=False)
            distribution = gr.LinePlot(x="age", y="probability", color="face", label="Age distribution", height=260)
            details = gr.JSON(label="JSON", visible=False)
            outputs = [annotated, table, distribution, details, message]
            run.click(on_photo, [photo, is_crop], outputs, api_name="predict", concurrency_limit=2)
            photo.upload(on_photo, [photo, is_crop], outputs, api_visibility="private", concurrency_limit=2)
            gr.Examples(
                examples=[[str(EXAMPLES_DIR / name), False] for name in ("three_portraits.jpg", "obama.jpg", "astronaut.jpg", "chelsea_the_cat.jpg")],
                inputs=[photo, is_crop],
                outputs=outputs,
                fn=on_photo,
                cache_examples=True,
                cache_mode="lazy",
            )
        with gr.Tab("Webcam"):
            tracker = gr.State(None)
            with gr.Row():
                camera = gr.Image(
                    label="Camera",
                    sources=["webcam"],
                    streaming=True,
                    type="numpy",
                    webcam_options=gr.WebcamOptions(mirror=True, constraints={"video": {"width": 640, "height": 480}}),
                )
                with gr.Column():
                    live = AnnotatedImage(label="Live labels", format="jpeg", type="pil")
                    live_labels = gr.Textbox(label="Faces in view", interactive=False)
            camera.stream(on_frame, [camera, tracker], [live, live_labels, tracker], stream_every=0.5, time_limit=300, concurrency_limit=4)
    return demo


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the age and gender Gradio app.")
    parser.add_argument("--model", default=os.environ.get("AGE_GENDER_MODEL", str(DEFAULT_MODEL)), help="Model folder or Hub id (env AGE_GENDER_MODEL).")
    parser.add_argument(
        "--dtype", default=os.environ.get("AGE_GENDER_DTYPE", "auto"), choices=["auto", "float32", "bfloat16"],
        help="auto: bfloat16 where the CPU computes it natively (up to 1.8x the speed, same results to 0.01 years), else float32 (env AGE_GENDER_DTYPE).",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"))
    parser.add_argument("--share", action="store_true")
    return parser.parse_args()


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas before the server starts its worker threads; True if applied.

    Each thread that decodes a photo otherwise gets an arena of its own, and freed image buffers stay mapped
    in them: the server grew from 481 to 760 MB over 2 minutes of benchmarks/app_load.py and kept growing;
    with two arenas it levels off near 615 MB. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_ARENA_MAX = -8
    return libc.mallopt(M_ARENA_MAX, arenas) == 1


def load_analyzer(model: str, dtype: str) -> FaceAnalyzer:
    """The analyzer, or an exit with a message that says what was tried instead of a traceback."""
    try:
        return FaceAnalyzer(model, dtype=dtype)
    except (OSError, ValueError) as error:
        where = "" if Path(model).is_dir() else "there is no such folder, and as a Hub id: "
        raise SystemExit(f"error: could not load a model from {model!r}: {where}{error}") from error


def launch(demo: gr.Blocks, **kwargs):
    """Queue and limits shared by `python app.py` and the tests: bounded uploads and a bounded queue, so many
    users are served one after another instead of exhausting memory."""
    demo.queue(max_size=128, default_concurrency_limit=2)
    return demo.launch(max_file_size=MAX_FILE_SIZE, ssr_mode=False, **kwargs)


if __name__ == "__main__":
    limit_malloc_arenas()
    args = parse_args()
    started = time.perf_counter()
    analyzer = load_analyzer(args.model, args.dtype)
    config = analyzer.model.config
    print(
        f"Loaded {args.model}: {config.backbone} backbone, {config.image_size}px, "
        f"{sum(p.numel() for p in analyzer.model.parameters()):,} parameters, {analyzer.model.dtype} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    launch(build_demo(analyzer), server_name=args.host, share=args.share)
