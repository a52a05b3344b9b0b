"""Response bodies of the HTTP API (they also document it in the OpenAPI page)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: str = Field(examples=["tabby"])
    index: int = Field(description="Class index: the output row and the line of labels.txt", examples=[281])
    score: float = Field(description="Softmax probability", examples=[0.91])


class ImageResult(BaseModel):
    predictions: list[Prediction]
    typical: bool | None = Field(
        None,
        description="Whether the image is like the model's training images (its feature distance is under the "
        "threshold the export derived); absent where the export fitted no such check",
    )
    confident: bool | None = Field(
        None,
        description="Whether to trust the answer: the top-1 probability reaches min_confidence and the image is "
        "typical; absent where neither check applies",
    )


class ClassifyResponse(BaseModel):
    model: str = Field(examples=["resnet50"])
    version: str = Field(examples=["1"])
    min_confidence: float | None = Field(
        None,
        description="The threshold `confident` was judged by: the request's min_confidence, else the model's "
        "abstain threshold (derived from held-out images at export), else none",
    )
    results: list[ImageResult] = Field(description="One entry per image, in request order")
    canary: str | None = Field(
        None,
        description="Only when a CANARY's candidate answered a request for its primary: that canary, PRIMARY:CANDIDATE",
        examples=["lenet5:lenet5_int8"],
    )


class ExplainedClass(BaseModel):
    index: int
    label: str
    score: float = Field(description="Its probability for the whole image")


class Explanation(BaseModel):
    method: str = Field(examples=["occlusion"])
    class_: ExplainedClass = Field(alias="class")
    layer: str = Field(description="Where the map lives: Grad-CAM's layer, or `input` for occlusion (the crop)")
    patch: int | None = Field(None, description="Occlusion's square, in input pixels")
    stride: int | None = Field(None, description="Occlusion's step")
    explained_by: dict[str, Any] | None = Field(
        None, description="A variant's Grad-CAM comes from its FP32 parent's explanation graph: which"
    )
    map: list[list[float]] = Field(description="Rows of floats in [0, 1], row-major, before upsampling")


class ExplainedImage(BaseModel):
    predictions: list[Prediction]
    explanation: Explanation
    overlay: str | None = Field(None, description="With overlay=true: the map over the crop, a base64 PNG")
    layers: dict[str, list[list[list[float]]]] | None = Field(
        None, description="With layers=true (LeNet-5): each layer's activations, [maps][rows][columns]"
    )


class ExplainResponse(BaseModel):
    model: str
    version: str
    results: list[ExplainedImage] = Field(description="One entry per image, in request order")


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong, and what would be right")


class VersionState(BaseModel):
    version: int
    status: str = Field(description="loading, ready, draining (finishing its requests before release) or failed")
    reason: str | None = Field(None, description="Why the version failed")
    in_flight: int = Field(description="Requests this version is answering now")
    since: str = Field(description="When it entered this state (UTC)")
    files_problem: str | None = Field(
        None,
        description="A served version whose files on disk no longer match what it loaded and verified, and how: "
        "it keeps serving what it loaded; restore its files (or export it again)",
    )


class ModelInfo(BaseModel):
    name: str
    version: int | None = Field(description="The version a request without ?version= gets: the highest ready one")
    versions: list[int] = Field(description="Versions present in the store")
    status: str = Field(
        description="That version's state: loading, ready, draining or failed; MODEL_CONTROL=on-demand adds "
        "'not loaded' and 'evicted' for models of the store that are not resident (a request loads them)"
    )
    reason: str | None = Field(None, description="Why the model is not ready")
    served: list[VersionState] = Field(
        default_factory=list, description="Every version this worker holds (its version policy), with its state"
    )
    provider: str | None = Field(None, description="ONNX Runtime execution provider serving it")
    session_host: int | None = Field(
        None, description="The process holding its sessions for every worker (SESSION_HOST=shared), by pid; null "
        "where the worker that answered holds its own",
    )  # fmt: skip
    input: dict[str, Any] | None = None
    num_classes: int | None = None
    num_params: int | None = None
    flops_per_image: int | None = None
    weights: dict[str, Any] | None = None
    architecture: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    explanation: dict[str, Any] | None = Field(
        None, description="Its Grad-CAM graph (POST /explain): layer, map size, verification, feature maps"
    )
    precision: str | None = Field(None, description="fp32, or int8 / fp16 for a variant", examples=["int8"])
    derived_from: dict[str, Any] | None = Field(None, description="A variant's FP32 model, version and graph sha256")
    accuracy: dict[str, Any] | None = Field(
        None, description="A variant against its FP32 model on held-out images: agreement, overlap, accuracies"
    )
    evaluation: dict[str, Any] | None = Field(
        None,
        description="A fine-tuned model's accuracy on the held-out split of its folder, measured on its graph: top-1, "
        "top-5, the floor it had to pass (per class and the confusion matrix with ?per_class=true)",
    )
    forced: bool | None = Field(None, description="A variant written with --force below its accuracy thresholds")
    load_seconds: float | None = None
    warmup_seconds: float | None = None
    max_batch_size: int | None = Field(
        None, description="The largest batch it runs now: MAX_BATCH_SIZE, or its config.pbtxt's max_batch_size where "
        "lower, halved after each batch the device had no memory for (in the worker that answered)",
    )  # fmt: skip
    batch_sizes: list[int] | None = Field(
        None, description="The batch shapes its sessions run, each warmed before it served: a batch is padded up to "
        "the next (BATCH_SIZES); null: any size up to max_batch_size",
    )  # fmt: skip
    cuda_graphs: bool | None = Field(
        None, description="Its sessions replay one CUDA graph per batch shape, captured before it served (CUDA_GRAPHS)"
    )
    residency: dict[str, Any] | None = Field(
        None,
        description="MODEL_CONTROL=on-demand: resident (bytes its load added, idle seconds), loading, not loaded, "
        "evicted or failed; pinned",
    )
    shadow: list[dict[str, Any]] | None = Field(
        None,
        description="SHADOW pairs this model is the primary of: the candidate's live agreement with it, and a verdict",
    )
    canary: dict[str, Any] | None = Field(
        None,
        description="The CANARY this model is the primary of: its state (running, paused, rolled_back, promoted, "
        "ended), fraction, step, reason, fallback (in this worker, why the primary answers the candidate's share; "
        "null while the candidate answers it), the current window's figures, the last verdict and the windows judged "
        "before",
    )
    quality: dict[str, Any] | None = Field(
        None,
        description="Is it still right: the abstain and typicality thresholds, the baseline its answers are compared "
        "with, and their drift over the latest DRIFT_WINDOW answers (in the worker that answered)",
    )


class Limits(BaseModel):
    """What a request may hold (the settings of the same names): a client checks its files against them before
    sending, instead of learning them from a 413 on a connection the server closes mid-upload."""

    max_body_bytes: int
    max_images_per_request: int
    max_top_k: int


class ModelList(BaseModel):
    default_model: str | None
    models: list[ModelInfo]
    limits: Limits


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Undecodable image or invalid parameter",
        404: "Unknown model or version (the message lists the available ones)",
        413: "Body, image or number of files over the limit",
        415: "Unsupported Content-Type",
        503: "Model not ready, or shedding load: retry later",
    }.items()
}
