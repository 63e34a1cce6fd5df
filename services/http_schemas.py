"""What the policy API accepts: the request schema of POST /v1/act, its limits, and the arguments of
the Serve app (`HTTPApiArgs`, the `args:` of a RayService application). Strict pydantic models:
unknown fields and loose JSON types are refused, so a client mistake becomes a named 422."""

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.config import PolicyConfig
from services.http_errors import APIError

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_IMAGE_SIDE = 1024
MIN_IMAGE_SIDE = 16
MAX_INSTRUCTION_CHARS = 512
MAX_PROMPT_TOKENS = 600
MAX_PROPRIO_DIMS = 64
MAX_TEMPERATURE = 5.0

Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageIn(_Strict):
    format: Literal["png", "jpeg", "raw"]
    data: str = Field(min_length=1, description="standard base64 (RFC 4648), no line breaks")
    shape: list[int] | None = Field(None, min_length=3, max_length=3, description="[H, W, 3]; raw only")

    @model_validator(mode="after")
    def _shape_only_for_raw(self):
        if self.format == "raw" and self.shape is None:
            raise ValueError("shape [H, W, 3] is required for raw images")
        if self.format != "raw" and self.shape is not None:
            raise ValueError(f"shape is only for raw images ({self.format} data carries its own size)")
        return self


class ActRequest(_Strict):
    image: ImageIn
    instruction: str = Field(min_length=1, max_length=MAX_INSTRUCTION_CHARS)
    proprio: list[Finite] | None = Field(None, max_length=MAX_PROPRIO_DIMS)
    greedy: bool = True
    temperature: Annotated[float, Field(gt=0, le=MAX_TEMPERATURE, allow_inf_nan=False)] | None = None

    @field_validator("instruction")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


def proprio_array(values: list[float] | None, dim: int | None) -> np.ndarray | None:
    """The request's proprio as the policy reads it. A policy that reads proprio needs exactly `dim`
    values (numpy would broadcast one value over all dims, and a missing one would fail the whole batch);
    a policy that does not read it ignores the field, so one robot client can drive either kind."""
    if not dim:
        return None
    if values is None:
        raise APIError(422, "invalid_request", f"proprio: required by this policy: a list of exactly {dim} numbers "
                       "(the robot state it was trained on; see /v1/info model.proprio_dim)", "proprio")
    if len(values) != dim:
        raise APIError(422, "invalid_request", f"proprio: {len(values)} value(s) given; this policy reads exactly {dim}",
                       "proprio")
    return np.asarray(values, np.float32)


class HTTPApiArgs(BaseModel):
    """Arguments of `app_builder` (the `args:` of a Serve config / RayService application)."""

    model_config = ConfigDict(extra="forbid")
    policy_path: str
    token_file: str | None = None
    auth: bool = True
    unnorm_key: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    policy: PolicyConfig | None = None  # the run's: what official folders do not record (chunk, center_crop)
    max_batch_size: int = Field(16, gt=0, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=1)
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024, le=64 * 1024 * 1024)
    max_image_side: int = Field(MAX_IMAGE_SIDE, ge=MIN_IMAGE_SIDE, le=4096)
    model_version: int = Field(0, ge=0)
    num_replicas: int = Field(1, gt=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica")
    torch_threads: int | None = Field(None, gt=0)
    seed: int = 0
