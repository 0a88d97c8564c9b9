"""The explorer API's response models (fixed) and request models (built per run: the lengths
and bounds of codes depend on the run's latent space).

No `from __future__ import annotations` here: pydantic and FastAPI read these annotations at run
time.
"""

import math
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from ..latent_space import LatentSpace

MAX_STEPS = 64  # codes on one interpolation path
MAX_DETAIL_TEMPERATURE = 2.0  # the largest scale of a hierarchy's redrawn lower-group noise



class Problem(BaseModel):
    detail: str = Field(description="what is wrong with the request and how to fix it")


ERRORS = {status: {"model": Problem, "description": text} for status, text in (
    (400, "malformed request or foreign Host header"),
    (403, "sent by a page of another site (Origin header)"), (413, "request or image too large"),
    (415, "upload is not an image the explorer reads"), (422, "a field is missing or invalid"))}


class Picture(BaseModel):
    image: str = Field(description="E[x | z] in the data's units, as a PNG data URL")
    detail: Optional[list[float]] = Field(None, description="a hierarchy's lower groups as "
                                          "decoded, in their priors' units (null: at their "
                                          "prior means)")


class Coded(BaseModel):
    z: list[float] = Field(description="the code, one number per latent dimension")
    image: str = Field(description="E[x | z] for the code, as a PNG data URL")


class Encoded(BaseModel):
    index: Optional[int] = Field(description="the test example encoded (null for an upload)")
    z: list[float] = Field(description="posterior mean code of the example")
    input: str = Field(description="the example as the model saw it, as a PNG data URL")
    image: str = Field(description="E[x | z] at the posterior mean code: the reconstruction")
    log_px: Optional[float] = Field(None, description="uploads: importance-sampled log p(x), "
                                    "nats, in the data's own units")
    log_px_se: Optional[float] = Field(None, description="its Monte Carlo standard error")
    score_k: Optional[int] = Field(None, description="importance samples behind log_px")
    test_percentile: Optional[float] = Field(None, description="percentile of log_px among "
                                             "the run's test examples (scored at the same k)")
    test_examples: Optional[int] = Field(None, description="test examples behind the "
                                         "percentile")


class Sampled(Coded):
    seed: int = Field(description="seed of the draw; send it again to repeat it")


class InterpolationPath(BaseModel):
    mode: str
    codes: list[list[float]]
    images: list[str]


class GalleryItem(BaseModel):
    index: int
    label: Optional[str]
    image: str = Field(description="the test example in the data's units, as a PNG data URL")


class Gallery(BaseModel):
    total: int = Field(description="test examples in all")
    items: list[GalleryItem]


class Evaluation(BaseModel):
    elbo: Optional[float] = None
    log_px: Optional[float] = None
    log_px_se: Optional[float] = None
    k: Optional[int] = None
    n: Optional[int] = None  # examples the figures average
    subset_of: Optional[int] = None  # examples of the split, when n is a random subset of them


class LowerGroup(BaseModel):
    name: str
    dims: int
    offset: int = Field(description="where the group starts in /api/decode's detail vector")
    dims_by_use: list[int] = Field(description="its dimensions, most used first")
    kl_per_dimension: list[float] = Field(description="mean KL of each dimension over the test "
                                          "set given the groups above, nats")
    unused: list[bool]


class Info(BaseModel):
    run: str
    dataset: str
    data_shape: list[int]
    images: bool = Field(description="whether examples are images (uploads accepted)")
    n_test: int
    label_names: Optional[list[str]]
    latent_dim: int
    prior: str
    prior_description: str
    likelihood: str
    scoring: str = Field(description="what the likelihood scores (the data pipeline)")
    slider_range: tuple[float, float]
    code_range: tuple[float, float] = Field(description="the range every code coordinate the "
                                            "API accepts must lie in")
    interpolation_modes: list[str]
    dims_by_use: list[int] = Field(description="latent dimensions, most used first")
    kl_per_dimension: list[float] = Field(description="mean KL(q(z_d|x) || p(z_d)) over the "
                                          "test set, nats, by dimension index")
    unused: list[bool]
    test_elbo: Optional[float] = Field(description="test ELBO per example after the last epoch")
    epochs: Optional[int]
    evaluation: Optional[Evaluation] = Field(description="from RUN_DIR/evaluation.json")
    max_upload_bytes: int
    max_image_side: int
    max_steps: int
    gallery_limit: int
    groups: list[tuple[str, int]] = Field(description="the model's latent groups (name, "
                                          "dimensions), the one the sliders steer first")
    detail_dim: int = Field(description="dimensions below the steered group (a hierarchy's "
                            "lower groups), which /api/decode can redraw; 0 for one group")
    lower_groups: list[LowerGroup] = Field(description="the groups below the steered one, in "
                                           "the order of the detail vector")


def whole_number(value):
    """JSON Schema's integer: 3 and 3.0 alike, but never true or "3"."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int_type", "Input should be an integer")
    return value


def integer(low: int, high: int, description: str = ""):
    # The bounds first: after a validator, pydantic would not put them in the JSON schema.
    return Annotated[int, Field(ge=low, le=high, strict=True, description=description or None),
                     BeforeValidator(whole_number)]


def code_type(dims: int, low: float, high: float):
    coordinate = Annotated[float, Field(ge=low, le=high, allow_inf_nan=False, strict=True)]
    return Annotated[list[coordinate], Field(min_length=dims, max_length=dims, description=(
        f"a code: {dims} finite numbers in [{low:g}, {high:g}]"))]


def request_models(space: LatentSpace, code_range: tuple[float, float]):
    strict = ConfigDict(extra="forbid")
    code = code_type(space.latent_dim, *code_range)
    last = max(len(space.test_x) - 1, 0)
    detail = {}  # a hierarchy's lower groups: redrawn from their priors, or at their means
    if space.detail_dim:
        detail = dict(
            detail_seed=(Optional[integer(0, 2**31 - 1)], Field(
                None, description="seed of the lower groups' noise (default: every lower "
                "group at its prior mean given the groups above)")),
            detail_temperature=(Annotated[float, Field(ge=0.0, le=MAX_DETAIL_TEMPERATURE,
                                                       allow_inf_nan=False)], Field(
                1.0, description="scale of the lower groups' noise")),
            detail=(Optional[code_type(space.detail_dim, *code_range)], Field(
                None, description="the lower groups' coordinates in their priors' own units, "
                "z_l = mu_p + sigma_p u_l, groups in order (instead of detail_seed)")))
    decode = create_model("DecodeRequest", __config__=strict, z=(code, ...), **detail)
    encode = create_model("EncodeRequest", __config__=strict,
                          index=(integer(0, last, "test example number"), ...))
    sample = create_model("SampleRequest", __config__=strict, seed=(
        Optional[integer(0, 2**31 - 1)],
        Field(None, description="seed of the draw (default: a fresh one)")))
    interpolate = create_model(
        "InterpolateRequest", __config__=strict, start=(code, ...), end=(code, ...),
        steps=(integer(2, MAX_STEPS, "codes on the path, both ends included"), 9),
        mode=(Optional[Literal["spherical", "linear"]],
              Field(None, description="path between the codes (default: the prior's own)")))
    return decode, encode, sample, interpolate
