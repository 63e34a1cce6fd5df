"""The one typed config of a run. Defaults are the paper's values (SimpleVLA-RL on LIBERO).

Every section forbids unknown keys, so a typo fails at load time with the allowed names;
cross-field rules live in model validators next to the fields they relate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from common.config_learner import LearnerConfig, SFTConfig
from common.section import Section


class TowerConfig(Section):
    """Size of a randomly initialised transformer (ignored when loading a checkpoint)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="LLM only; None = num_heads")
    intermediate_size: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        return self


class PolicyConfig(Section):
    path: Path | None = Field(None, description="local checkpoint folder (HF layout); None = random init")
    vision_backbone: Literal["siglip", "dinov2", "dinosiglip"] = "dinosiglip"
    image_size: int = Field(224, ge=28)
    patch_size: int = Field(14, ge=2)
    vision: TowerConfig = TowerConfig()
    fused_vision: TowerConfig | None = Field(
        None, description="dinosiglip: the second (SigLIP) tower's sizes when they differ from `vision`'s, as in the "
                          "real model (DINOv2 ViT-L/14 + SigLIP So400m/14); None = the same sizes as `vision`")
    llm: TowerConfig = TowerConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)
    action_bins: Literal[256] = 256
    action_chunk: int = Field(8, gt=0)
    action_dims: int = Field(7, gt=0)
    unnorm_key: str | None = None
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    use_proprio: bool = Field(False, description="one projected proprio token after the image patches")
    proprio_dim: int = Field(8, gt=0)
    action_queries: Literal["zeros", "learned"] = Field(
        "zeros", description="zeros = OpenVLA-OFT; learned = one embedding per action token (small models from scratch)"
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:\d+)?|meta)$",
        description="where the policy is built or loaded, in `dtype`, without a full-precision CPU copy first; Ray "
                    "actors granted a GPU use cuda whatever this says; meta = shapes only (no memory)")
    compile: bool = Field(
        False, description="Serve replicas torch.compile every transformer block (regional): +28 % chunks/s at "
        "batch 32 for the 7B policy on an H200, paid once per batch size at start; for GPU replicas")
    cuda_graphs: bool = Field(
        False, description="GPU Serve replicas replay each batch shape's forward as a CUDA graph (batches padded to "
        "the next of 1-8, 12, 16, ..., cluster.inference_max_batch): no per-kernel launch cost on the host; needs "
        "cluster.replica_gpus > 0")
    center_crop: float | None = Field(
        None, gt=0, le=1,
        description="fraction of the image AREA kept by a center crop before resizing (OpenVLA/OFT checkpoints "
                    "trained with image augmentation: 0.9); None = no crop, or what the policy folder says",
    )

    @model_validator(mode="after")
    def _patches_tile_image(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.fused_vision is not None and self.vision_backbone != "dinosiglip":
            raise ValueError(f"fused_vision sizes a second tower; vision_backbone {self.vision_backbone!r} has one")
        return self


class InitStateConfig(Section):
    """Which initial states train and which evaluate. `disjoint` keeps them apart (no leakage);
    `paper` trains and evaluates on the same states, as the original does."""

    split: Literal["disjoint", "paper"] = "disjoint"
    num_train: int = Field(25, gt=0)
    num_eval: int = Field(25, gt=0)

    def needed(self) -> int:
        """Initial states per task the split takes."""
        return self.num_train + (self.num_eval if self.split == "disjoint" else 0)


class EnvConfig(Section):
    backend: Literal["tabletop", "libero", "maniskill"] = "libero"
    suite: str = "libero_spatial"
    tasks: list[str] | None = Field(None, description="task names; None = every task of the suite")
    image_size: int = Field(224, ge=16)
    max_steps: int = Field(512, gt=0, description="env steps per episode (RL; SimpleVLA-RL uses 512 on LIBERO)")
    eval_max_steps: int | None = Field(
        None, gt=0, description="step limit of `vla-grpo eval`; None = the suite's OpenVLA limit (LIBERO), else max_steps"
    )
    task_max_steps: dict[str, PositiveInt] = Field(
        default_factory=dict,
        description="per-task step limits (gymnasium's per-env max_episode_steps); unlisted tasks use max_steps",
    )
    num_steps_wait: int = Field(10, ge=0)
    step_timeout_s: float = Field(
        30.0, gt=0, description="deadline per env step (a chunk of k actions gets k times this); a stuck env is rebuilt"
    )
    msaa: bool = Field(False, description="LIBERO: 4x multisampling as robosuite's default; off renders ~2.5x faster")
    control: Literal["delta", "absolute"] = Field(
        "delta",
        description="tabletop: position dims are per-step deltas (LIBERO's OSC convention) or absolute gripper "
                    "targets in the workspace box scaled to [-1, 1] (Diffusion Policy / ACT style position control)",
    )
    init_states: InitStateConfig = InitStateConfig()
    sim_backend: Literal["physx_cpu", "physx_cuda"] = Field(
        "physx_cpu", description="ManiSkill's physics: physx_cpu = one scene per env (each worker slot its own env); "
        "physx_cuda = PhysX on the GPU: each env worker holds ONE ManiSkill env of cluster.envs_per_worker scenes, "
        "stepped and rendered as one batch (env_workers/maniskill/batched_env.py; one task per run)")
    batched: bool = Field(
        False, description="ManiSkill on physx_cpu: the batched worker of physx_cuda with one scene per worker "
        "(ManiSkill's CPU sim holds one), the same code path on a machine without a GPU; physx_cuda is always batched")

    @model_validator(mode="after")
    def _control_supported(self):
        if self.control == "absolute" and self.backend != "tabletop":
            raise ValueError(f"control 'absolute' exists for the tabletop backend only (backend is {self.backend!r})")
        if self.batched_sim and self.backend != "maniskill":
            raise ValueError(f"env.sim_backend physx_cuda / env.batched exist for the maniskill backend only "
                             f"(backend is {self.backend!r})")
        if self.backend == "libero":
            from env_workers.libero.suites import NUM_INIT_STATES  # numpy only: no LIBERO import

            if self.init_states.needed() > NUM_INIT_STATES:
                s = self.init_states
                raise ValueError(f"init_states: every LIBERO task has {NUM_INIT_STATES} initial states, but split "
                                 f"{s.split!r} with num_train={s.num_train}, num_eval={s.num_eval} needs "
                                 f"{s.needed()}; e.g. num_train=25, num_eval=25")
        if self.batched_sim and self.num_steps_wait:
            raise ValueError(f"env.num_steps_wait must be 0 for a batched ManiSkill env (settle steps would step "
                             f"every scene of the batch), got {self.num_steps_wait}")
        return self

    @property
    def batched_sim(self) -> bool:
        """Each env worker holds one batched ManiSkill env (one slot per scene) instead of one env per slot."""
        return self.batched or self.sim_backend == "physx_cuda"

    def step_limit(self, task: str) -> int:
        """The step limit of one task's episodes."""
        return self.task_max_steps.get(task, self.max_steps)


class RolloutConfig(Section):
    group_size: int = Field(8, ge=2)
    temperature: float = Field(1.6, gt=0)
    groups_per_batch: int = Field(64, gt=0)
    min_group_success: float = Field(0.1, ge=0, le=1)
    max_group_success: float = Field(0.9, ge=0, le=1)
    max_policy_lag: int = Field(0, ge=0, description="0 = strict on-policy (the paper)")
    keep_surplus: bool = True
    max_rounds: int = Field(50, gt=0, description="rollout rounds per step before giving up on filling the batch")
    task_sampling: Literal["uniform", "adaptive", "adaptive_state"] = Field(
        "uniform", description="uniform: cycle every (task, init state) (the paper); adaptive: tasks in proportion "
        "to their recent rollout failure rate; adaptive_state: tasks so, then init states by their own recent groups "
        "(failing and likely kept by dynamic sampling) (actors/samplers.py)")
    task_sampling_floor: float = Field(0.1, gt=0, le=1, description="adaptive, adaptive_state: least weight of a task before normalising")
    task_sampling_ema: float = Field(0.25, gt=0, le=1, description="adaptive, adaptive_state: moving-average rate of a task's failure-rate estimate")
    queue_capacity: int = Field(
        1024, gt=0, description="most trajectories the driver holds, finished or in flight (ready groups, surplus, "
        "open groups); no group is launched past it (backpressure); at least groups_per_batch x group_size")
    rollout_timeout_s: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _bounds_ordered(self):
        if self.min_group_success > self.max_group_success:
            raise ValueError(
                f"min_group_success {self.min_group_success} must be <= max_group_success {self.max_group_success}"
            )
        if self.queue_capacity < self.groups_per_batch * self.group_size:
            raise ValueError(f"queue_capacity {self.queue_capacity} must hold a batch: at least groups_per_batch x "
                             f"group_size = {self.groups_per_batch * self.group_size}")
        return self


class EvalConfig(Section):
    episodes_per_task: int | None = Field(None, gt=0, description="None = every eval initial state")
    videos: int = Field(2, ge=0)
    validate_every: int | None = Field(
        None, gt=0, description="every this many RL steps (and after the last), a greedy evaluation on RL training "
        "initial states; an earlier policy that validated clearly better than the last one (validation_margin_se) "
        "is what GRPO saves and the final evaluation serves; None = the last policy")
    validation_states_per_task: int = Field(20, gt=0, description="validate_every: train initial states per task, "
                                            "the same ones every time")
    validation_margin_se: float = Field(
        2.0, ge=0, description="validate_every: an earlier policy replaces the last one only when it validated better "
        "by more than this many standard errors of the difference (binomial); 0 = whichever validated best")


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address; None starts a local cluster")
    num_env_workers: int = Field(2, gt=0)
    envs_per_worker: int = Field(4, gt=0)
    serve_replicas: int = Field(1, gt=0)
    learner_world_size: int = Field(1, gt=0)
    env_worker_cpus: float = Field(1.0, ge=0)
    env_worker_gpus: float = Field(
        0.0, ge=0, description="GPU share of each env worker: env.sim_backend physx_cuda simulates and renders its "
        "scenes there (several workers, or workers and replicas, can share one GPU with fractions)")
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: float = Field(0.0, ge=0)
    inference_max_batch: int = Field(
        64, gt=0, description="@serve.batch max_batch_size of the policy service: requests per forward pass, "
        "each carrying one env worker's waiting envs (at most envs_per_worker observations)"
    )
    inference_batch_wait_ms: float = Field(
        5.0, ge=0, description="how long a replica waits to fill a batch; longer = bigger batches, more latency"
    )
    worker_batch_wait_ms: float = Field(
        500.0, ge=0, description="an env worker sends its waiting envs' observations as soon as every busy env "
        "waits (one policy request per worker round), or once this long passed with no other env joining them "
        "(one env is slow, e.g. a reset that builds a scene). Keep it above one env's chunk of steps (LIBERO: "
        "a few hundred ms): firing early splits rounds into more requests, firing late costs at most one "
        "inference latency per slow env, since the sim thread is busy with that env meanwhile"
    )
    worker_request_groups: int | None = Field(
        None, ge=1, description="policy requests per env-worker round: with 2, a request leaves once half of the "
        "worker's busy envs wait, and the sim thread steps the other half while it is answered (simulation overlaps "
        "inference, for one more Serve request a round, ~7 CPU-ms). None: 2 where the replicas have GPUs "
        "(replica_gpus > 0), else 1 (inference on the CPU competes with the sims, so the overlap gains nothing)"
    )
    learner_cpus: float = Field(1.0, ge=0)
    learner_gpus: float = Field(0.0, ge=0)
    comm_backend: Literal["gloo", "nccl"] = "gloo"
    resources: dict[Literal["sim", "inference", "learner"], str] = Field(
        default_factory=dict, description="role -> custom Ray resource name that pins it to a node group"
    )

    @property
    def request_groups_per_worker(self) -> int:
        """`worker_request_groups`, or its default for where inference runs."""
        if self.worker_request_groups is not None:
            return self.worker_request_groups
        return 2 if self.replica_gpus > 0 else 1


class LoggingConfig(Section):
    tensorboard: bool = True
    metrics_port: int | None = Field(None, ge=1024, le=65535)
    console: bool = True


class CheckpointConfig(Section):
    every: int = Field(10, gt=0, description="RL steps between checkpoints")
    keep: int = Field(2, gt=0)
    resume: bool = False


class RunConfig(Section):
    run_dir: Path = Path("runs/default")
    seed: int = 0
    total_steps: int = Field(100, gt=0, description="RL steps")
    wall_budget_minutes: float | None = Field(
        None, gt=0, description="end GRPO at a step boundary before the run passes this many minutes from its start "
        "(the demo counts its SFT and evaluations in); None = total_steps alone")
    policy: PolicyConfig = PolicyConfig()
    env: EnvConfig = EnvConfig()
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _policy_fits_the_env(self):
        """The policy's action head and proprio input must have the env's dims (7 / 8 per arm)."""
        from env_workers.factory import env_action_dims, env_proprio_dim

        dims, proprio = env_action_dims(self.env), env_proprio_dim(self.env)
        where = f"env.backend {self.env.backend!r} suite {self.env.suite!r}"
        if self.policy.action_dims != dims:
            raise ValueError(f"policy.action_dims {self.policy.action_dims} does not match the {dims} action dims of "
                             f"{where}; set policy.action_dims={dims}")
        if self.policy.use_proprio and self.policy.proprio_dim != proprio:
            raise ValueError(f"policy.proprio_dim {self.policy.proprio_dim} does not match the {proprio} proprio dims "
                             f"of {where}; set policy.proprio_dim={proprio}")
        return self

    @model_validator(mode="after")
    def _batch_splits_into_minibatches(self):
        batch = self.rollout.groups_per_batch * self.rollout.group_size
        if batch % self.learner.mini_batch_size:
            raise ValueError(
                f"rollout batch (groups_per_batch x group_size = {batch}) must be a multiple of "
                f"learner.mini_batch_size {self.learner.mini_batch_size}"
            )
        if self.learner.mini_batch_size % self.cluster.learner_world_size:
            raise ValueError(
                f"learner.mini_batch_size {self.learner.mini_batch_size} must be a multiple of "
                f"cluster.learner_world_size {self.cluster.learner_world_size} (each rank trains an equal share)"
            )
        if self.sft.batch_size < self.cluster.learner_world_size:
            raise ValueError(f"sft.batch_size {self.sft.batch_size} leaves a learner rank without samples: at least "
                             f"cluster.learner_world_size {self.cluster.learner_world_size}")
        if self.env.sim_backend == "physx_cuda" and self.cluster.env_worker_gpus <= 0:
            raise ValueError("cluster.env_worker_gpus must be > 0 with env.sim_backend physx_cuda (each env worker "
                             "simulates and renders its scenes on a GPU), e.g. 0.5")
        if self.env.batched_sim and self.env.sim_backend == "physx_cpu" and self.cluster.envs_per_worker != 1:
            raise ValueError(f"cluster.envs_per_worker must be 1 for a batched env on physx_cpu (ManiSkill's CPU sim "
                             f"holds one scene; physx_cuda holds many), got {self.cluster.envs_per_worker}")
        if self.policy.cuda_graphs and self.cluster.replica_gpus <= 0:
            raise ValueError("policy.cuda_graphs needs GPU replicas: set cluster.replica_gpus > 0 (e.g. 0.5), or "
                             "policy.cuda_graphs=false for replicas on the CPU")
        if self.learner.sync_every - 1 > self.rollout.max_policy_lag:
            raise ValueError(f"learner.sync_every {self.learner.sync_every} leaves the replicas up to "
                             f"{self.learner.sync_every - 1} versions behind, more than rollout.max_policy_lag "
                             f"{self.rollout.max_policy_lag}; raise max_policy_lag or sync every step")
        return self
