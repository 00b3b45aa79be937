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
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from gradio.components.image import ImageData
from PIL import Image
from pydantic import model_validator

from faces import DEFAULT_MODEL, FaceAnalyzer, FaceRecord, FaceTracker, PhotoResult, annotate, face_colour, face_label
from faces.analysis import CHILD_AGE, CONFIDENT_GENDER_SCORE, RUNTIMES
from modeling import InvalidImageError

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_FILE_SIZE = "10mb"
# Annotated photos go out as JPEG at this quality: 1-6 ms to encode a 600x600 photo against 85 ms for PNG
# (as much again as the whole analysis), an eighth of the bytes, and labels that stay sharp.
OUTPUT_QUALITY = 92
# Uploads and results are deleted from gradio's cache every hour once two hours old, so that a long-running
# server (a Space) does not fill its disk with every photo it was ever sent.
CACHE_LIFETIME = (3600, 7200)
# The age with its interval in one column: four columns fit a phone's width without breaking a header.
TABLE_COLUMNS = ["face", "age (80% interval)", "gender", "confidence"]
MAX_CHART_FACES = 10  # more curves than this are unreadable; the table lists every face
EXAMPLE_PHOTOS = {  # file -> its accessible name
    "three_portraits.jpg": "Three portraits: Barack Obama, Joe Biden, Eileen Collins",
    "obama.jpg": "Portrait of Barack Obama",
    "astronaut.jpg": "Astronaut Eileen Collins",
    "chelsea_the_cat.jpg": "A cat (no human face)",
}
PHOTO_HEIGHT = 320  # px: with the examples under the photo, both fit a laptop's first screen (1280x900)
# Scroll the results into view when they are not (a phone, after tapping an example far below them).
SCROLL_TO_RESULTS = """() => {
    const results = document.getElementById("results");
    if (!results) return;
    const box = results.getBoundingClientRect();
    if (box.top < 0 || box.top > window.innerHeight * 0.6) results.scrollIntoView({behavior: "smooth", block: "start"});
}"""
# Phones: table headers whole, the labelled photo as large as its box, the chart's image scaled to the width;
# the chart image's alt text (gradio writes "undefined plot visualising provided data").
PAGE_CSS = """
#faces-table th, #faces-table th * { word-break: keep-all !important; overflow-wrap: normal !important; hyphens: none; }
#labelled-photo img { object-fit: contain; }
#age-chart img { width: 100%; max-width: 560px; height: auto; }
@media (max-width: 640px) {
    #labelled-photo, #labelled-photo .image-container, #labelled-photo .image-frame, #labelled-photo img { height: auto !important; }
    #labelled-photo img { width: 100%; }
    #faces-table th, #faces-table td { padding-left: 0 !important; padding-right: 0 !important; }
    #faces-table th *, #faces-table td * { font-size: 14px !important; padding-left: 3px !important; padding-right: 3px !important; }
}
"""
PAGE_HEAD = """<script>
new MutationObserver(() => {
    const chart = document.querySelector("#age-chart img");
    if (chart && !chart.alt.startsWith("Chart")) chart.alt = "Chart of the age distribution of each face found, one coloured curve per numbered face";
    const names = %s;
    document.querySelectorAll("button.gallery-item").forEach((button, i) => {
        if (names[i] && button.getAttribute("aria-label") !== "Example: " + names[i]) button.setAttribute("aria-label", "Example: " + names[i]);
    });
}).observe(document.documentElement, {subtree: true, childList: true, attributes: true, attributeFilter: ["src"]});
</script>""" % json.dumps(list(EXAMPLE_PHOTOS.values()))
# Browsers send a webcam frame this often; one 640x480 frame takes about 30 ms to analyse here.
WEBCAM_INTERVAL = 0.2
# The detection threshold a user may choose: below 0.3 boxes on non-faces multiply; above 0.95 real faces go.
MIN_THRESHOLD, MAX_THRESHOLD = 0.3, 0.95
logger = logging.getLogger("age_gender_app")


# The two components below change one method of a gr.Image instance instead of subclassing gr.Image: gradio
# writes a .pyi stub beside the source file of every Component subclass, which would put app.pyi into the
# project each time the app starts.


class UploadedPhoto(ImageData):
    """The photo input's payload, which keeps a bare string (a path or URL typed into an API call) apart instead
    of failing validation: gradio answered that with "has not enabled verbose error reporting"; `photo_input`
    then refuses it in words, without reading it."""

    bare_string: str | None = None

    @model_validator(mode="before")
    @classmethod
    def keep_bare_strings_apart(cls, value):
        return {"path": "", "bare_string": value} if isinstance(value, str) else value


def user_mistake(message: str) -> gr.Error:
    """The error a user's mistake gets: shown to them, and one line in the server log instead of a traceback
    (tracebacks are kept for the app's own faults)."""
    logger.warning("refused a request: %s", message)
    return gr.Error(message, print_exception=False)


def uploaded_path(payload: UploadedPhoto | None) -> str | None:
    """The uploaded file's path; a bare string is refused, never read."""
    if payload is not None and payload.bare_string is not None:
        raise user_mistake(
            f"The photo must be sent as a file, not as the text {payload.bare_string[:80]!r}: with gradio_client, pass "
            "handle_file(path_or_url). The server reads only files uploaded to it."
        )
    return None if payload is None else payload.path


def photo_input(**kwargs) -> gr.Image:
    """A gr.Image input that hands over the uploaded file as it is, undecoded: `FaceAnalyzer` reads it (EXIF
    rotation, any mode, size limits) and says clearly what is wrong with a file that is not a readable image,
    so that the page can show the message and clear the input instead of a server error."""
    component = gr.Image(type="filepath", **kwargs)
    component.preprocess = uploaded_path
    component.data_model = UploadedPhoto
    return component


def annotated_image(**kwargs) -> gr.Image:
    """A gr.Image output whose cached file is written under a temporary name and renamed into place.

    Gradio names a cached output after a hash of its bytes, so two users who send the same photo share one
    file; gradio 6.31 rewrites that file in place, and a user still downloading it got a truncated image
    ("Too little data for declared Content-Length": 4 of 309 requests under benchmarks/app_load.py)."""
    component = gr.Image(type="pil", format="jpeg", **kwargs)
    postprocess = component.postprocess

    def postprocess_atomically(value):
        if isinstance(value, Image.Image):
            value = cache_image_atomically(value, component.GRADIO_CACHE, component.format)
        return postprocess(value)

    component.postprocess = postprocess_atomically
    return component


def threshold_slider(**kwargs) -> gr.Slider:
    """A gr.Slider whose typed values outside its range reach the function instead of a red error toast and a
    silent clamp in the browser: the page then brings them into range and says so in its message, and the API
    refuses them in words (`checked_threshold`)."""
    component = gr.Slider(**kwargs)
    component.preprocess = lambda payload: None if payload is None else float(payload)
    return component


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


def faces_table(faces: list[FaceRecord]):
    """One row per face, numbered as on the photo, the number cell in the face's colour."""
    rows = [
        [i + 1, f"{f.age:.0f} ({f.age_interval[0]}-{f.age_interval[1]})", f.gender, f"{f.gender_score:.0%}"]
        for i, f in enumerate(faces)
    ]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    colours = [f"background-color: {face_colour(i)}; color: white; font-weight: bold" for i in range(len(faces))]
    return table.style.apply(lambda column: colours, subset=["face"])


def age_chart(faces: list[FaceRecord], min_age: int) -> Figure | None:
    """The age distributions of the first `MAX_CHART_FACES` faces, each in its colour, on an age axis that spans
    those faces."""
    if not faces:
        return None
    faces = faces[:MAX_CHART_FACES]
    ages = np.arange(min_age, min_age + len(faces[0].age_distribution))
    low = min(f.age_interval[0] for f in faces) - 10
    high = max(f.age_interval[1] for f in faces) + 10
    # Fixed margins, not layout="constrained": that layout doubled the time to draw the chart (about 100 ms
    # against 50 ms here), as long as the whole face analysis of a photo. A narrow figure with large type and the
    # legend under the plot stays readable when a phone shrinks it to 360 px (the legend at the side was 4 px).
    rows = (len(faces) + 1) // 2
    figure = Figure(figsize=(4.8, 2.9 + 0.3 * rows))
    figure.subplots_adjust(left=0.15, right=0.97, top=0.97, bottom=0.17 + 0.095 * rows + 0.05)
    axes = figure.add_subplot()
    for i, face in enumerate(faces):
        axes.plot(ages, face.age_distribution, color=face_colour(i), linewidth=2.5, label=face_label(i, face))
        axes.fill_between(ages, face.age_distribution, color=face_colour(i), alpha=0.12)
    axes.set_xlim(max(min_age, low), min(ages[-1], high))
    axes.set_ylim(bottom=0)
    axes.set_xlabel("age (years)", fontsize=12)
    axes.set_ylabel("probability", fontsize=12)
    axes.tick_params(labelsize=11)
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False, fontsize=14, handlelength=1.2, columnspacing=1.0)
    return figure


def summary_message(result: PhotoResult, seconds: float) -> str:
    width, height = result.size
    count = len(result.faces)
    if count == 0:
        return (
            f"**No face found** in this {width}x{height} photo, so no age or gender is given. If it is a close-up "
            "of one face, tick *This photo is already a face crop*; if a face is small or blurred, lower the "
            "detection threshold."
        )
    numbered = " Numbers on the photo match the table and the chart (rows top to bottom, left to right)." if count > 1 else ""
    if count > MAX_CHART_FACES:
        numbered += f" The chart shows faces 1-{MAX_CHART_FACES}; the table lists all {count}."
    return f"Found {count} face{'s' if count != 1 else ''} in {seconds * 1000:.0f} ms ({width}x{height} photo).{numbered}"


def checked_threshold(min_score: float | None) -> float | None:
    """The detection threshold a caller sent, refused in words outside `MIN_THRESHOLD`-`MAX_THRESHOLD`."""
    if min_score is not None and not MIN_THRESHOLD <= min_score <= MAX_THRESHOLD:
        raise user_mistake(
            f"The detection threshold {min_score:g} is outside {MIN_THRESHOLD}-{MAX_THRESHOLD}: below it boxes land on "
            "things that are not faces, above it real faces are missed. Send a value in that range."
        )
    return min_score


def predict_photo(analyzer: FaceAnalyzer, image_path: str | None, is_face_crop: bool = False, min_score: float | None = None):
    """Detect (faces scoring at least `min_score`, default the analyzer's), align and label every face. Returns
    the annotated photo, a table, the age distributions, the faces as JSON (box and landmarks in the sent
    photo's pixels, age, interval, gender, confidence) and a message; bad input raises gr.Error, and is logged
    as one line (a traceback is kept for the app's own faults)."""
    if image_path is None:
        raise user_mistake("Upload a photo first.")
    min_score = checked_threshold(min_score)
    started = time.perf_counter()
    name = Path(image_path).name
    try:
        result = analyzer.analyze(image_path, assume_face_crop=is_face_crop, min_score=min_score)
    except InvalidImageError as error:
        reason = str(error).replace(repr(str(image_path)), repr(name)).replace(str(image_path), name)
        raise user_mistake(f"{name} cannot be used: {reason}. Upload a JPEG, PNG, WebP or similar photo.") from error
    except Exception as error:
        logger.exception("failed on an upload")
        raise gr.Error(f"Could not process {name} ({type(error).__name__}); this is a fault of the app, not of your photo.") from error
    payload = {"faces": [face.to_json() for face in result.faces], "image_size": list(result.size)}
    return (
        annotate(result.image, result.faces),
        faces_table(result.faces),
        age_chart(result.faces, analyzer.model.config.min_age),
        payload,
        summary_message(result, time.perf_counter() - started),
    )


def predict_photo_on_page(analyzer: FaceAnalyzer, image_path: str | None, is_face_crop: bool = False, min_score: float | None = None):
    """`predict_photo` for the page: a bad file leaves the page clean, with the message, the photo input
    emptied and empty results, instead of error badges on every output. A threshold typed outside the range is
    brought to its nearest end, and the message says so. Every output gets a value, never `gr.skip()`: gradio
    answers an update by rebuilding the component from its arguments, which would drop the methods that
    `photo_input` and `annotated_image` change."""
    if image_path is None:
        return None, *empty_results("Upload a photo first, or click an example.")
    note = ""
    if min_score is not None and not MIN_THRESHOLD <= min_score <= MAX_THRESHOLD:
        used = min(max(min_score, MIN_THRESHOLD), MAX_THRESHOLD)
        note = f" The detection threshold {min_score:g} is outside {MIN_THRESHOLD}-{MAX_THRESHOLD}; {used:g} was used."
        min_score = used
    try:
        *results, message = predict_photo(analyzer, image_path, is_face_crop, min_score)
        return image_path, *results, message + note
    except gr.Error as error:
        return None, *empty_results(f"**This file could not be used:** {error.message}")


def empty_results(message: str = "") -> tuple:
    """The photo tab's outputs with nothing in them but `message`: after a removed photo or a bad file."""
    return None, faces_table([]), None, None, message


def stream_webcam(analyzer: FaceAnalyzer, frame: np.ndarray | None, tracker: FaceTracker | None):
    """Label a webcam frame, smoothing ages and genders across frames; also returns the labels as text, with
    the frames per second the stream reaches."""
    tracker = tracker or FaceTracker()
    if frame is None:
        return None, "", tracker
    result = analyzer.analyze(frame)
    faces = tracker.update(result.faces, analyzer.model.config)
    labels = ", ".join(face_label(i, face) for i, face in enumerate(faces)) or "no face in view"
    rate = tracker.frame_rate()
    return annotate(result.image, faces), labels + (f"  ·  {rate:.1f} frames/s" if rate else ""), tracker


def build_demo(analyzer: FaceAnalyzer, concurrency: int = 2) -> gr.Blocks:
    """The app's interface around one loaded analyzer; `concurrency` photos are analysed at a time, whichever
    way they come (upload, button, tick, example or API)."""
    photo_queue = {"concurrency_limit": concurrency, "concurrency_id": "photo"}

    default_threshold = analyzer.detector.score_threshold

    def on_photo(image_path: str | None, is_face_crop: bool = False, min_score: float = default_threshold):
        return predict_photo(analyzer, image_path, is_face_crop, min_score)

    def on_photo_page(image_path: str | None, is_face_crop: bool, min_score: float):
        return predict_photo_on_page(analyzer, image_path, is_face_crop, min_score)

    def on_example(image_path: str):
        """An example is a whole photo at the default threshold: detection on, whatever the settings were."""
        photo_update, *results = predict_photo_on_page(analyzer, image_path, False, default_threshold)
        return photo_update, False, default_threshold, *results

    def on_frame(frame: np.ndarray | None, tracker: FaceTracker | None):
        return stream_webcam(analyzer, frame, tracker)

    with gr.Blocks(title="Age and gender estimation", delete_cache=CACHE_LIFETIME) as demo:
        gr.Markdown(
            "# Age and gender estimation\nFinds every face, aligns it the way the model was trained, and labels it "
            "with an age, an interval meant to hold 80% of true ages, and a gender. Estimates from appearance "
            "only: not for decisions about people."
        )
        with gr.Tab("Photo"):
            # The outputs are made first and placed below (render), so that the examples, which need them, can sit
            # right under the photo: in a laptop's first screen and within a thumb's reach on a phone.
            annotated = annotated_image(
                label="Labelled photo", show_label=False, height=PHOTO_HEIGHT, buttons=[],  # buttons would cover labels
                alt_text="The photo with a numbered box and label on each face found", elem_id="labelled-photo", render=False,
            )
            message = gr.Markdown(render=False)
            table = gr.Dataframe(
                label=f"One row per face, numbered as on the photo. On real photos a gender under {CONFIDENT_GENDER_SCORE:.0%} confidence, and any child's (read as under {CHILD_AGE}), is a guess, marked ? on the photo (model card)",
                headers=TABLE_COLUMNS, interactive=False, wrap=True, elem_id="faces-table", render=False,
            )
            chart = gr.Plot(label="Age distribution of each face", show_label=False, format="png", elem_id="age-chart", render=False)
            details = gr.JSON(label="JSON", visible=False, render=False)
            outputs = [annotated, table, chart, details, message]
            with gr.Row():
                with gr.Column():
                    photo = photo_input(label="Photo", sources=["upload", "clipboard"], height=PHOTO_HEIGHT)
                    is_crop = gr.Checkbox(label="This photo is already a face crop (skip detection)", render=False)
                    threshold = threshold_slider(
                        minimum=MIN_THRESHOLD, maximum=MAX_THRESHOLD, value=default_threshold, step=0.05, label="Face detection threshold",
                        info="Raise it if boxes land on hands, patterns or pictures; lower it to find small or blurred faces. "
                        "The photo re-runs when you let go (after typing a value, press Estimate).", render=False,
                    )
                    gr.Examples(
                        examples=[[str(EXAMPLES_DIR / name)] for name in EXAMPLE_PHOTOS],
                        inputs=[photo],
                        outputs=[photo, is_crop, threshold, *outputs],
                        fn=on_example,
                        cache_examples=False,
                        run_on_click=True,
                        label="Examples (click one)",
                    )
                    is_crop.render()
                    threshold.render()
                    run = gr.Button("Estimate", variant="primary")
                with gr.Column(elem_id="results"):
                    # No label badge on the photo: it would sit over the top-left corner, where a face crop's label is.
                    annotated.render()
                    message.render()
            table.render()
            gr.Markdown("**Age distribution of each face**")
            chart.render()
            details.render()
            page_events = dict(fn=on_photo_page, inputs=[photo, is_crop, threshold], outputs=[photo, *outputs], api_visibility="private", **photo_queue)
            run.click(**page_events)
            photo.upload(**page_events)
            is_crop.input(**page_events)  # a user's tick re-runs; an example resetting it does not
            photo.clear(lambda: empty_results(), outputs=outputs, api_visibility="private")  # removing the photo clears its results
            threshold.release(**page_events)
            # A new result is brought into view (on a phone it lies below the examples that were tapped).
            message.change(None, js=SCROLL_TO_RESULTS)
            # The API endpoint: the same analysis, with errors raised to the caller instead of shown on the page.
            api_trigger = gr.Button(visible=False)
            api_trigger.click(on_photo, [photo, is_crop, threshold], outputs, api_name="predict", **photo_queue)
        with gr.Tab("Webcam"):
            gr.Markdown(
                "Click the camera area and allow the browser to use your camera, then press the record button to "
                "start labelling and stop to end. Frames are analysed about five times a second; the rate reached "
                "is shown at the end of the *Faces in view* line."
            )
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
                    live = annotated_image(label="Live labels")
                    live_labels = gr.Textbox(label="Faces in view", interactive=False)
            camera.stream(on_frame, [camera, tracker], [live, live_labels, tracker], stream_every=WEBCAM_INTERVAL, time_limit=300, concurrency_limit=concurrency, concurrency_id="webcam")
    return demo


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the age and gender Gradio app.")
    parser.add_argument("--model", default=os.environ.get("AGE_GENDER_MODEL", str(DEFAULT_MODEL)), help="Model folder or Hub id (env AGE_GENDER_MODEL).")
    parser.add_argument(
        "--dtype", default=os.environ.get("AGE_GENDER_DTYPE", "auto"), choices=["auto", "float32", "bfloat16"],
        help="auto: bfloat16 where the CPU computes it natively (up to 1.8x the speed, same results to 0.01 years), else float32 (env AGE_GENDER_DTYPE).",
    )
    parser.add_argument(
        "--runtime", default=os.environ.get("AGE_GENDER_RUNTIME", "torch"), choices=list(RUNTIMES),
        help="torch, or the model folder's ONNX export on onnxruntime: onnx (float32) or onnx-int8 (env AGE_GENDER_RUNTIME; README: ONNX).",
    )
    parser.add_argument(
        "--concurrency", type=int, default=int(os.environ.get("AGE_GENDER_CONCURRENCY", 2)),
        help="Photos analysed at a time (env AGE_GENDER_CONCURRENCY). 2 served more requests per second than 1 on a 2-core machine (benchmarks/app_load.py).",
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


def load_analyzer(model: str, dtype: str, runtime: str = "torch") -> FaceAnalyzer:
    """The analyzer, or an exit with a message that says what was tried instead of a traceback."""
    try:
        return FaceAnalyzer(model, dtype=dtype, runtime=runtime)
    except FileNotFoundError as error:  # a path to a folder that does not exist: refused before any Hub call
        raise SystemExit(f"error: could not load a model from {model!r}: there is no such folder ({error})") from error
    except (OSError, ValueError) as error:
        where = "" if Path(model).is_dir() else "there is no such folder, and as a Hub id: "
        raise SystemExit(f"error: could not load a model from {model!r}: {where}{error}") from error


def launch(demo: gr.Blocks, **kwargs):
    """Queue and limits shared by `python app.py` and the tests: bounded uploads and a bounded queue, so many
    users are served one after another instead of exhausting memory."""
    demo.queue(max_size=128, default_concurrency_limit=2)
    return demo.launch(max_file_size=MAX_FILE_SIZE, ssr_mode=False, css=PAGE_CSS, head=PAGE_HEAD, **kwargs)


def main() -> None:
    """`python app.py`, or `age-gender-app` once the project is installed."""
    limit_malloc_arenas()
    args = parse_args()
    started = time.perf_counter()
    analyzer = load_analyzer(args.model, args.dtype, args.runtime)
    config = analyzer.model.config
    print(
        f"Loaded {args.model}: {config.backbone} backbone"
        f"{f' x{config.ensemble_size} networks' if config.ensemble_size > 1 else ''}, {config.image_size}px, "
        f"{sum(p.numel() for p in analyzer.model.parameters()):,} parameters, {analyzer.model.dtype} on {args.runtime} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    launch(build_demo(analyzer, args.concurrency), server_name=args.host, share=args.share)


if __name__ == "__main__":
    main()
