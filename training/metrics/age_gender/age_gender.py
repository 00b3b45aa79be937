"""Age and gender metrics as a local `evaluate` module: age MAE, CS@5 and gender accuracy."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores an age and gender estimator. `age_mae` is the mean absolute error in years; `age_cs5` is the
cumulative score at 5 years, the share of faces whose age error is at most 5 years; `gender_accuracy` is
the share of faces whose gender is right.
"""

_KWARGS_DESCRIPTION = """
Args:
    age_predictions (`list[float]`): predicted ages in years.
    age_references (`list[float]`): true ages in years.
    gender_predictions (`list[int]`): predicted gender ids.
    gender_references (`list[int]`): true gender ids.
    cs_threshold (`float`, defaults to 5): the error in years that CS counts as right.
Returns:
    `{"age_mae": float, "age_cs5": float, "gender_accuracy": float, "count": int}`
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AgeGender(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "age_predictions": datasets.Value("float32"),
                    "age_references": datasets.Value("float32"),
                    "gender_predictions": datasets.Value("int32"),
                    "gender_references": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, age_predictions, age_references, gender_predictions, gender_references, cs_threshold=5.0):
        errors = np.abs(np.asarray(age_predictions, dtype=np.float64) - np.asarray(age_references, dtype=np.float64))
        gender_right = np.asarray(gender_predictions) == np.asarray(gender_references)
        if errors.size == 0:
            raise ValueError("no predictions to score")
        return {
            "age_mae": float(errors.mean()),
            "age_cs5": float((errors <= cs_threshold).mean()),
            "gender_accuracy": float(gender_right.mean()),
            "count": int(errors.size),
        }
