"""Task specifications: the class set, the malignant set and the official metric of each task.

Class names always come from a TaskSpec, never from the column order of a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TaskError

MODALITIES: tuple[str, ...] = ("clinical", "dermoscopic")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    classes: tuple[str, ...]
    malignant: frozenset[str]
    metric: str  # "milk10k_dice" or "balanced_accuracy"
    modalities: tuple[str, ...] = MODALITIES
    description: str = ""
    # header of the id column of a predictions file: "lesion_id" (MILK10k format), or "image" for the
    # single-image ISIC challenges, whose official submissions are headed `image`
    id_column: str = "lesion_id"
    # the manifest column holding the ids the official format keys rows by, when they are not the lesion ids
    # (Derm7pt: meta.csv's image path, kept by the importer as `source_image`); "" = lesion_id
    id_source: str = ""
    class_descriptions: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    criteria: str = ""  # a criteria set (dermfusion.criteria) the task's manifests may carry as aux_<name> labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, cls: str) -> int:
        try:
            return self.classes.index(cls)
        except ValueError:
            raise TaskError(f"class {cls!r} is not part of task {self.name!r} (classes: {', '.join(self.classes)})") from None

    @property
    def malignant_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c in self.malignant]

    @property
    def melanoma_class(self) -> str | None:
        return "MEL" if "MEL" in self.classes else None

    def label_columns(self) -> list[str]:
        return [f"label_{c}" for c in self.classes]


MILK10K = TaskSpec(
    name="milk10k",
    classes=("AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC"),
    malignant=frozenset({"AKIEC", "BCC", "MAL_OTH", "MEL", "SCCKA"}),
    metric="milk10k_dice",
    description="ISIC MILK10k: 11 classes, clinical close-up + dermoscopic image per lesion, MONET concepts",
    class_descriptions={
        "AKIEC": "actinic keratosis / intraepidermal carcinoma",
        "BCC": "basal cell carcinoma",
        "BEN_OTH": "other benign proliferation",
        "BKL": "benign keratinocytic lesion",
        "DF": "dermatofibroma",
        "INF": "inflammatory / infectious",
        "MAL_OTH": "other malignant proliferation",
        "MEL": "melanoma",
        "NV": "melanocytic nevus",
        "SCCKA": "squamous cell carcinoma / keratoacanthoma",
        "VASC": "vascular lesion",
    },
)

ISIC2018 = TaskSpec(
    name="isic2018",
    classes=("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"),
    malignant=frozenset({"MEL", "BCC", "AKIEC"}),
    metric="balanced_accuracy",
    modalities=("dermoscopic",),
    description="HAM10000 / ISIC 2018 Task 3: 7 classes, one dermoscopic image per lesion",
    id_column="image",
)
HAM10000 = ISIC2018

ISIC2019 = TaskSpec(
    name="isic2019",
    classes=("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"),
    malignant=frozenset({"MEL", "BCC", "AK", "SCC"}),
    metric="balanced_accuracy",
    modalities=("dermoscopic",),
    description="ISIC 2019: 8 classes, one dermoscopic image per lesion",
    id_column="image",
)

DERM7PT = TaskSpec(
    name="derm7pt",
    classes=("BCC", "NEV", "MEL", "SK", "MISC"),
    malignant=frozenset({"BCC", "MEL"}),
    metric="balanced_accuracy",
    modalities=("dermoscopic",),
    description="Derm7pt: the usual 5 diagnosis groups, 7-point checklist criteria as auxiliary targets",
    id_column="image",
    id_source="source_image",
    criteria="seven_point",
)

PAD_UFES_20 = TaskSpec(
    name="pad_ufes_20",
    classes=("ACK", "BCC", "MEL", "NEV", "SCC", "SEK"),
    malignant=frozenset({"BCC", "MEL", "SCC"}),
    metric="balanced_accuracy",
    modalities=("clinical",),
    description="PAD-UFES-20: 6 classes, smartphone clinical images with metadata",
)

TASKS: dict[str, TaskSpec] = {t.name: t for t in (MILK10K, ISIC2018, ISIC2019, DERM7PT, PAD_UFES_20)}
TASKS["ham10000"] = ISIC2018


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
