"""Drawing the faces on the photo: each face numbered, in a colour of its own that the app's table and chart
share, with labels sized to the face and kept apart when faces are close."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .analysis import FaceRecord

# Tableau 10: ten colours that stay distinct from one another and readable under white text.
FACE_COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]


def face_colour(index: int) -> str:
    """The colour of face number `index + 1`, the same on the photo, in the table and in the chart."""
    return FACE_COLOURS[index % len(FACE_COLOURS)]


def face_label(index: int, face: FaceRecord) -> str:
    """"1: F 31 (27-36)"."""
    return f"{index + 1}: {face.label}"


def photo_label(index: int, face: FaceRecord, count: int) -> str:
    """The label drawn on the photo: shorter as faces get more numerous, so that labels large enough to read on
    a phone still fit beside their faces; the table and chart always give the full reading."""
    if count <= 4:
        return face_label(index, face)
    if count <= 9:
        return f"{index + 1}: {face.gender_mark} {face.age:.0f}"
    return str(index + 1)


def annotate(image: Image.Image, faces: list[FaceRecord], max_side: int = 1280) -> Image.Image:
    """A copy of the photo, shrunk to at most `max_side`, with a numbered box and label per face.

    Labels are at least 1/30 of the picture's long side high, so that they stay readable when a phone shows
    the picture small (about 13 px on a 390 px screen), and larger for large faces; a label that would cover
    another goes below its face or further down."""
    scale = min(1.0, max_side / max(image.size))
    canvas = image.convert("RGB")
    canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)), Image.Resampling.LANCZOS) if scale < 1 else canvas.copy()
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(canvas.size) / 320))
    placed: list[tuple[float, float, float, float]] = []
    for index, face in enumerate(faces):
        x0, y0, x1, y1 = (v * scale for v in face.box)
        colour = face_colour(index)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        font_size = round(max(max(canvas.size) / 30, min((y1 - y0) / 3, max(canvas.size) / 15), 11))
        font = ImageFont.load_default(size=font_size)
        text = photo_label(index, face, len(faces))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left + 2 * line, bottom - top + 2 * line
        label_x = min(max(0, x0), max(0, canvas.width - width))
        label_box = place_label(label_x, y0, y1, width, height, canvas.height, placed)
        placed.append(label_box)
        draw.rectangle(label_box, fill=colour)
        draw.text((label_box[0] + line - left, label_box[1] + line - top), text, fill="white", font=font)
    return canvas


def place_label(x: float, box_top: float, box_bottom: float, width: float, height: float, canvas_height: float, placed: list) -> tuple:
    """The first of: above the face, inside its top edge, below the face, then lower still, that covers no label
    already placed and stays in the picture."""
    candidates = [box_top - height, box_top, box_bottom] + [box_bottom + k * height for k in range(1, 6)]
    for top in candidates:
        top = min(max(0.0, top), canvas_height - height)
        rect = (x, top, x + width, top + height)
        if not any(rect[0] < p[2] and p[0] < rect[2] and rect[1] < p[3] and p[1] < rect[3] for p in placed):
            return rect
    return (x, min(max(0.0, box_top - height), canvas_height - height), x + width, min(max(0.0, box_top - height), canvas_height - height) + height)
