"""Webcam smoothing: the same face from frame to frame keeps a steady label."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

import torch

from modeling.modeling_age_gender import age_interval_bounds

from .analysis import FaceRecord


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two `[x0, y0, x1, y1]` boxes."""
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    box: list[int]
    age: float
    age_std: float
    female_prob: float
    missed: int = 0


class FaceTracker:
    """Smooths webcam predictions across frames: each face is matched to the previous frame's by box overlap,
    and its age and gender probability are exponential moving averages, so labels do not jump."""

    def __init__(self, smoothing: float = 0.7, min_iou: float = 0.3, max_missed: int = 3):
        self.smoothing = smoothing
        self.min_iou = min_iou
        self.max_missed = max_missed
        self.tracks: list[Track] = []
        self.frame_times: deque[float] = deque(maxlen=10)

    def frame_rate(self) -> float | None:
        """Frames per second over the last (up to) ten frames, once there are two."""
        if len(self.frame_times) < 2 or self.frame_times[-1] <= self.frame_times[0]:
            return None
        return (len(self.frame_times) - 1) / (self.frame_times[-1] - self.frame_times[0])

    def update(self, faces: list[FaceRecord], model_config) -> list[FaceRecord]:
        """The faces of a new frame with smoothed age, interval and gender."""
        self.frame_times.append(time.monotonic())
        unmatched = list(self.tracks)
        smoothed, tracks = [], []
        for face in faces:
            female_prob = face.gender_score if face.gender == "female" else 1 - face.gender_score
            match = max(unmatched, key=lambda t: box_iou(t.box, face.box), default=None)
            if match is not None and box_iou(match.box, face.box) >= self.min_iou:
                unmatched.remove(match)
                keep = self.smoothing
                track = Track(
                    box=face.box,
                    age=keep * match.age + (1 - keep) * face.age,
                    age_std=keep * match.age_std + (1 - keep) * face.age_std,
                    female_prob=keep * match.female_prob + (1 - keep) * female_prob,
                )
            else:
                track = Track(box=face.box, age=face.age, age_std=face.age_std, female_prob=female_prob)
            tracks.append(track)
            smoothed.append(self.as_record(track, face, model_config))
        self.tracks = tracks + [Track(**{**asdict(t), "missed": t.missed + 1}) for t in unmatched if t.missed + 1 <= self.max_missed]
        return smoothed

    @staticmethod
    def as_record(track: Track, face: FaceRecord, config) -> FaceRecord:
        low, high = age_interval_bounds(torch.tensor(track.age), torch.tensor(track.age_std), config)
        female = track.female_prob >= 0.5
        return FaceRecord(
            box=face.box,
            age=round(track.age, 1),
            age_interval=[int(low), int(high)],
            age_std=round(track.age_std, 2),
            gender="female" if female else "male",
            gender_score=round(track.female_prob if female else 1 - track.female_prob, 4),
            detection_score=face.detection_score,
            landmarks=face.landmarks,
        )
