"""Webcam smoothing: the same face from frame to frame keeps a steady label."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from modeling.modeling_age_gender import prediction_records

from .analysis import FaceRecord
from .detection import box_iou


@dataclass
class Track:
    """A face followed across frames: its last box and its smoothed age and gender distributions."""

    box: list[int]
    age_probs: torch.Tensor
    gender_probs: torch.Tensor
    missed: int = 0


class FaceTracker:
    """Smooths webcam predictions across frames: each face is matched to the previous frame's by box overlap,
    and its age and gender distributions are exponential moving averages, so labels do not jump. Answers are
    read off the smoothed distributions exactly as off a single frame's (`prediction_records`)."""

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
            track = Track(box=face.box, age_probs=torch.tensor(face.age_distribution), gender_probs=torch.tensor(face.gender_probs))
            match = max(unmatched, key=lambda t: box_iou(t.box, face.box), default=None)
            if match is not None and box_iou(match.box, face.box) >= self.min_iou:
                unmatched.remove(match)
                track.age_probs = self.smoothing * match.age_probs + (1 - self.smoothing) * track.age_probs
                track.gender_probs = self.smoothing * match.gender_probs + (1 - self.smoothing) * track.gender_probs
            tracks.append(track)
            (record,) = prediction_records(track.age_probs[None], track.gender_probs[None], model_config, return_distributions=True)
            smoothed.append(replace(face, **record))
        self.tracks = tracks + [replace(t, missed=t.missed + 1) for t in unmatched if t.missed + 1 <= self.max_missed]
        return smoothed
