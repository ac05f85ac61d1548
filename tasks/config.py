"""Typed run configuration.

The CLI, a YAML file (``--config``), ``--set key=value`` overrides and deployment
parameters in ``prefect.yaml`` all produce the same frozen :class:`RunConfig`,
which is the flow's only parameter (Prefect derives the UI form from it).
Nothing here reads settings at import time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.errors import ConfigError
from tasks.redaction import find_credentials, redact

DEFAULT_OUTPUT = "./artifacts"


class Frozen(BaseModel):
    # coerce_numbers_to_str: `--set app.positive_label=0` (YAML reads 0 as a number) is the label "0"
    # allow_inf_nan=False: `--lr inf` passed (inf > 0) and the run failed in training, reported as a bug
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        """No setting may carry a secret: it would be echoed in messages, logs, Prefect and manifests."""
        for item in value if isinstance(value, (tuple, list)) else (value,):
            what = find_credentials(item) if isinstance(item, str) else None
            if what:
                raise ValueError(
                    f"holds {what}; remove it and give keys through the environment (AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY), a profile or a Prefect block, never in a URI"
                )
        return value


class LoadConfig(Frozen):
    """Where the data is and which columns play which role."""

    input: str | None = Field(
        None, description="Training data: a CSV/Parquet file, folder or glob at any fsspec URI (./x.csv, s3://b/raw/*.parquet)."
    )
    apply_to: str | None = Field(
        None, description="Data to apply the model to (default: the input). Same forms as input."
    )
    format: Literal["auto", "csv", "parquet"] = Field("auto", description="File format; auto goes by extension.")
    label_column: str | None = Field(None, description="Kept out of training; used for evaluation and plots.")
    id_column: str | None = Field(None, description="Carried through to every output table.")
    exclude_columns: tuple[str, ...] = Field((), description="Columns to ignore entirely.")
    blocksize_mb: int = Field(64, ge=1, description="Target size of one Dask partition when splitting large CSV files.")

    @field_validator("exclude_columns", mode="before")
    @classmethod
    def _one_name_is_a_list_of_one(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            # YAML `exclude_columns:` and --set load.exclude_columns= (clearing a --config file's list) exclude
            # nothing; they were refused, and excluded a column named '' ("not found", exit 3)
            return ()
        return (v,) if isinstance(v, str) else v  # YAML `exclude_columns: notes`, --set load.exclude_columns=notes

    @model_validator(mode="after")
    def _roles_are_distinct(self) -> LoadConfig:
        # Decided from the settings alone, before any data is read (exit 2, as the other contradictions)
        if self.label_column is not None and self.label_column == self.id_column:
            raise ValueError(f"{self.label_column!r} is both the label_column and the id_column; a column has one role")
        for role, col in (("id_column", self.id_column), ("label_column", self.label_column)):
            if col is not None and col in self.exclude_columns:
                raise ValueError(f"{col!r} is the {role} and also in exclude_columns; a column has one role")
        return self


class PreprocessConfig(Frozen):
    """Scaling and the train/validation split (computed on the Dask cluster)."""

    scaler: Literal["standard", "minmax", "none"] = Field("standard", description="Feature scaling fitted on training rows.")
    val_fraction: float = Field(0.2, ge=0.0, lt=0.9, description="Share of rows (images) held out for validation; reduce, impute and "
                                "denoise also report their metrics on them.")
    split_seed: int = Field(0, ge=0, description="Seed of the deterministic train/validation split.")
    max_categories: int = Field(
        100, ge=1, description="Most distinct values a categorical column may have at fit time (one-hot width)."
    )


def parse_widths(text: str) -> tuple[int, ...]:
    """``"256,128"`` -> ``(256, 128)``; ``"none"`` -> ``()`` (a linear autoencoder: no hidden layer).

    The one reading of ``--hidden`` and of a ``model.hidden`` string (YAML, --set). An empty text or an
    empty width (``"64,,32"``) is refused rather than read as fewer layers.
    """
    t = text.strip()
    if t.lower() == "none":
        return ()
    parts = [w.strip() for w in t.split(",")]
    if not t or any(not w for w in parts):
        raise ValueError(f"hidden {text!r} has an empty width: give comma-separated integers, e.g. 256,128 "
                         "(or none for a linear autoencoder)")
    try:
        return tuple(int(w) for w in parts)
    except ValueError:
        raise ValueError(f"hidden expects comma-separated integers, e.g. 256,128, got {text!r}") from None


class ModelConfig(Frozen):
    """Autoencoder architecture."""

    latent_dim: int = Field(8, ge=1, le=4096, description="Width of the code z.")
    hidden: tuple[int, ...] = Field((256, 128), description="Encoder widths from input to code; the decoder mirrors them.")
    activation: Literal["relu", "gelu", "silu", "tanh", "leaky_relu", "elu"] = Field(
        "gelu", description="Nonlinearity after every hidden layer (relu, gelu, silu, tanh, leaky_relu, elu); the code "
        "layer and the output are linear.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after every hidden layer while training (0: none).")
    batch_norm: bool = Field(False, description="Batch normalisation before every hidden layer's nonlinearity.")

    @field_validator("hidden", mode="before")
    @classmethod
    def _widths_as_the_cli_takes_them(cls, v: Any) -> Any:
        """``64`` and ``"256,128"`` (YAML, --set) as well as lists, as ``--hidden 256,128`` takes them."""
        if isinstance(v, int) and not isinstance(v, bool):
            return (v,)
        if isinstance(v, str):
            return parse_widths(v)
        if v is None:  # `--set model.hidden=null`, `hidden: ~`: none, as `--hidden none`
            return ()
        return v

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(h < 1 for h in v):
            raise ValueError(f"hidden widths must be >= 1, got {list(v)}")
        return v

    def dense(self, in_features: int) -> Any:
        """This architecture as a ``models.dense.DenseAEConfig`` for ``in_features`` input columns."""
        from models.dense import DenseAEConfig

        return DenseAEConfig(in_features, self.latent_dim, tuple(self.hidden), self.activation, self.dropout,
                             self.batch_norm)


class TrainConfig(Frozen):
    """Optimiser, early stopping and device."""

    epochs: int = Field(200, ge=1, description="Upper bound; early stopping usually ends sooner.")
    batch_size: int | None = Field(
        None, ge=1,
        description="Training batch size, used as given on every device (lr as given). Unset: default_batch_size on CPU; "
        "on CUDA a batch that fills the device for the model at hand (default_batch_size x 2^k, see the README), "
        "with lr scaled by sqrt(batch / default_batch_size).",
    )
    default_batch_size: int = Field(
        256, ge=1, description="The batch the application's lr is tuned for: used when batch_size is unset on CPU, "
        "and the smallest automatic batch on CUDA.",
    )
    lr: float = Field(1e-3, gt=0, description="Adam's learning rate at default_batch_size.")
    weight_decay: float = Field(0.0, ge=0, description="Adam's L2 penalty on the weights (0: none).")
    patience: int = Field(15, ge=1, description="Epochs without validation improvement before stopping.")
    seed: int = Field(0, ge=0, lt=2**32 - 2, description="Seed of the initial weights, batches and sampled metrics.")
    device: str = Field("auto", description="auto (cuda if present, else cpu), cpu, cuda or cuda:N.")
    threads: int = Field(
        0, ge=0,
        description="CPU threads for training (0: PyTorch's default, one per core). 1 on a CPU shared with other busy "
        "jobs: small models slow down many times when their threads compete. Not part of the run's fingerprint.",
    )
    compile: Literal["off", "on", "auto"] = Field(
        "auto", description="torch.compile the model: off, on, or auto (CUDA only, when the rest of the run, timed on "
        "its first steps, would take over 2 minutes; CUDA graphs for short steps). Not part of the run's fingerprint.",
    )
    checkpoint_seconds: float = Field(
        60.0, ge=0, description="At most one training checkpoint per this many seconds, at an epoch's end or within a "
        "long epoch (with the position in it); 0 = after every epoch. Not part of the run's fingerprint.",
    )
    stream: Literal["auto", "on", "off"] = Field(
        "auto", description="Train from minibatches streamed from the prepared Parquet partitions (on), from the "
        "training rows in memory (off), or stream when they take more than half of memory_mb (auto). reduce and "
        "extract stream; detect, impute and index fit a seeded sample of what fits memory_mb instead (on is auto, "
        "off takes every row); denoise and compress use neither setting.",
    )
    memory_mb: int = Field(
        512, ge=1, description="Memory bound for training data: in-memory rows up to half of it (stream=auto); a "
        "stream's shuffle buffer, reads and queued batches within it.",
    )


class AppConfig(Frozen):
    """Base of each application's own settings (``tasks/apps/<name>.py: Config``)."""

    name: ClassVar[str] = ""


class RunConfig(Frozen):
    """One run of one application. Subclassed per application with its ``app`` type."""

    app: AppConfig = AppConfig()
    output: str = Field(DEFAULT_OUTPUT, description="Artifact root: a local folder or s3://bucket/prefix (default: $AEFLOW_OUTPUT, else ./artifacts).")
    model_run: str | None = Field(
        None, description="Reuse the model of this run (its URI) instead of training: train once, apply daily."
    )
    run_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Name the run: letters, digits, '.', '_' and '-', not 'latest' (default: time + fingerprint).",
    )
    dask_address: str | None = Field(None, description="Existing Dask scheduler, e.g. tcp://host:8786 (default: $AEFLOW_DASK_ADDRESS, else a LocalCluster).")
    local_cluster: Literal["auto", "processes", "threads"] = Field(
        "auto", description="Without dask_address, the run's own LocalCluster: worker processes (parallel pandas work; "
        "each imports the libraries, ~10-15 s per run on 2 cores), worker threads in the run's process (up in a second), "
        "or auto: threads when the inputs total at most 256 MB, processes beyond.",
    )
    skip_existing: bool = Field(
        False, description="Skip the run when a complete run with the same input and config exists (idempotent backfills)."
    )
    load: LoadConfig = LoadConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    # Fields that change where or how fast a run happens but not what it computes.
    _NOT_FINGERPRINTED: ClassVar[tuple[str, ...]] = ("output", "run_id", "dask_address", "local_cluster", "skip_existing")
    # Sections or keys ("section.key") the application never reads, and what sets that instead: a value other
    # than the default is refused (it would change nothing but the fingerprint), --show-config leaves them out.
    UNUSED: ClassVar[dict[str, str]] = {}

    @field_validator("output")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty (an unset variable?): give a folder or s3://bucket/prefix, or leave it out for "
                             "$AEFLOW_OUTPUT, else ./artifacts")
        return v

    @field_validator("run_id")
    @classmethod
    def _not_latest(cls, v: str | None) -> str | None:
        if v == "latest":
            raise ValueError("'latest' is what --model latest means (the newest trained model); name the run otherwise")
        return v

    @model_validator(mode="before")
    @classmethod
    def _keep_section_defaults(cls, data: Any) -> Any:
        """Setting one key of a section keeps the application's other defaults of that section.

        An application may default a section differently (reduce: ``latent_dim=2``); without
        this, ``--hidden 64`` would rebuild ``model`` from ModelConfig's own defaults and
        silently drop the application's.
        """
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            info = cls.model_fields.get(name)
            default = info.default if info is not None else None
            if isinstance(value, dict) and isinstance(default, BaseModel):
                out[name] = {**default.model_dump(), **value}
        return out

    @model_validator(mode="after")
    def _unused_settings_left_at_default(self) -> RunConfig:
        said = []
        for path, instead in self.UNUSED.items():
            section, *rest = path.split(".")
            given, default = getattr(self, section), type(self).model_fields[section].default
            for key in rest:
                given, default = getattr(given, key), getattr(default, key)
            if given != default:
                changed = _changed_keys(given, default, path) if isinstance(default, BaseModel) else [f"{path}={given!r}"]
                said.append(f"{', '.join(changed)} ({instead})")
        if said:
            raise ValueError(f"not used by {self.app_name}, leave out: {'; '.join(said)}")
        return self

    @property
    def app_name(self) -> str:
        return type(self.app).name

    def fingerprint(self, input_hashes: dict[str, Any]) -> str:
        """Hash of (app, inputs' content hashes, config): equal runs have equal fingerprints."""
        cfg = self.model_dump(mode="json", exclude=set(self._NOT_FINGERPRINTED))
        cfg["train"].pop("device", None)
        for key in ("threads", "compile", "checkpoint_seconds"):  # how it runs, not what it computes (as device)
            cfg["train"].pop(key, None)
        blob = json.dumps({"app": self.app_name, "inputs": input_hashes, "config": cfg}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _changed_keys(given: BaseModel, default: BaseModel, path: str) -> list[str]:
    """The dotted keys of ``given`` that differ from ``default`` (same model type), as ``section.key=value``."""
    return [f"{path}.{k}={getattr(given, k)!r}" for k in type(default).model_fields
            if getattr(given, k) != getattr(default, k)]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def _yaml_scalar_as_given(raw: str, value: Any) -> Any:
    """A ``--set`` value that YAML 1.1 read as a number or a date in a form other than the number's own (``007``,
    ``12:30`` = 750, ``0x1F``, ``1_000``, ``2024-01-01``): the text as given. ``--set load.id_column=007`` became the
    column "7" where ``--id-column 007`` is "007"; a numeric setting still reads such text as pydantic does."""
    import datetime

    text = raw.strip()
    if isinstance(value, (datetime.date, datetime.datetime)):
        return text
    if isinstance(value, (int, float)) and not isinstance(value, bool) and text != str(value):
        # 1.50, 1.0e-3, +5 are the number as written (and .inf, refused by name as not finite): kept a number
        if _PLAIN_NUMBER.fullmatch(text) or (isinstance(value, float) and not math.isfinite(value)):
            return value
        return text
    return value


_PLAIN_NUMBER = re.compile(r"[+-]?(?:0|[1-9]\d*)(?:\.\d*)?(?:[eE][+-]?\d+)?|[+-]?\.\d+(?:[eE][+-]?\d+)?")


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``--set key.path=value``; the value is read as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        # YAML 1.1 reads on/off/yes/no as booleans; keep the word (train.stream=off is the setting
        # "off"), and pydantic still reads it as a boolean for a boolean setting.
        value = raw.strip()
    return key, _yaml_scalar_as_given(raw, value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key repeated in one mapping: PyYAML keeps the last one silently, so a second
    ``train:`` block appended to a ``--show-config`` file dropped every setting of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge (<<: *base) may be overridden by the mapping's own keys
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} a second time (first at line {seen[key].line + 1}); give each key once",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads on/off/yes/no as booleans: `stream: off` in a config file reached the setting as False
# and was refused as "Input should be 'auto', 'on' or 'off' (got False)". In a config file, as in YAML 1.2 and
# as for --set, only true/false are booleans; a boolean setting still reads the words on/off/yes/no (pydantic).
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its text spans lines and names "<unicode string>")."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = [e.context] if e.context and e.problem else []  # ("while parsing a flow sequence")
        if mark is not None:
            where.append(f"line {mark.line + 1}, column {mark.column + 1}")
        # not "context: problem": "while scanning for the next token: found ..." read as a secret to redact
        return (e.problem or e.context or "invalid") + (f" ({', '.join(where)})" if where else "")
    return " ".join(str(e).split())


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError as e:
        raise ConfigError(f"config file {str(p)!r} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, not text
        reason = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot be read: {e.strerror or e}"
        raise ConfigError(f"config file {str(p)!r} {reason}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


def _keys_at(cls: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The keys the config class ``cls`` accepts in the section that ``loc`` (a pydantic error's location) names."""
    for name in loc:
        field = cls.model_fields.get(str(name)) if cls is not None else None
        inner = field.annotation if field is not None else None
        cls = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return list(cls.model_fields) if cls is not None else []


def _every_key(cls: type[BaseModel] | None, prefix: str = "") -> list[str]:
    """Every dotted key of the config class ``cls``, sections' keys included (model.latent_dim...)."""
    out: list[str] = []
    for name, field in (cls.model_fields.items() if cls is not None else ()):
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out += _every_key(inner, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def format_validation_error(e: ValidationError, cls: type[BaseModel] | None = None) -> str:
    """One line from pydantic's errors; with ``cls``, a key it does not know comes with the closest known ones."""
    import difflib

    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        got = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        shown = redact(repr(got))
        # a validator's own message may already name the value ("..., got 50"): not "(got 50)" again
        said = any(f"got {v}" in msg for v in (shown, redact(str(got))))
        got_s = "" if isinstance(got, dict) or said else f" (got {shown})"
        if err["type"] == "extra_forbidden" and err["loc"]:
            close = difflib.get_close_matches(str(err["loc"][-1]), _keys_at(cls, err["loc"][:-1]), n=2, cutoff=0.7)
            section = ".".join(str(x) for x in err["loc"][:-1])
            # a key of another section (latent_dim under train: or at the top): where it belongs
            elsewhere = [] if close else [k for k in _every_key(cls) if k.rsplit(".", 1)[-1] == str(err["loc"][-1])]
            close = [".".join(filter(None, (section, c))) for c in close] + elsewhere
            msg += f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        parts.append(f"{loc}: {msg}{got_s}" if loc else f"{msg}{got_s}")
    return "invalid configuration: " + "; ".join(parts)


def given_config(
    file: str | Path | None = None,
    options: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> dict[str, Any]:
    """What the user gave, nested and unvalidated: YAML file < options that are not None < ``--set`` items."""
    data: dict[str, Any] = read_config_file(file) if file else {}
    data.pop("app_name", None)
    for name, field in RunConfig.model_fields.items():
        if isinstance(field.default, BaseModel) and name in data and data[name] is None:
            del data[name]  # `train:` with every key commented out: nothing given (it was refused as not a mapping)
        elif isinstance(field.default, BaseModel) and name in data and not isinstance(data[name], dict):
            # `train: 5`: said of the file here; an option setting train.epochs blamed a --set that was never given
            raise ConfigError(f"config file {str(file)!r}: {name!r} must be a section ({name}: followed by indented "
                              f"'key: value' lines), got {redact(repr(data[name]))}")
    for key, value in (options or {}).items():
        if value is not None:
            _set_path(data, key, value)
    for item in sets or []:
        key, value = parse_set(item)
        _set_path(data, key, value)
    return data


def resolve_config(
    cls: type[RunConfig],
    *,
    file: str | Path | None = None,
    options: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """Build a run config: defaults < YAML file < explicit options < ``--set`` items.

    Args:
        cls: The application's RunConfig subclass.
        file: Optional YAML file with the same nesting as the config.
        options: Dotted paths to values given on the command line (``None`` = not given).
        sets: ``key.path=value`` strings.

    Raises:
        ConfigError: naming the offending key and value.
    """
    data = given_config(file, options, sets)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_another_apps_config(cls, data) or format_validation_error(e, cls)) from e


def _another_apps_config(cls: type[RunConfig], data: dict[str, Any]) -> str:
    """The message for a config of another application (``aeflow run detect --show-config`` given to reduce):
    its ``app`` section's keys are all that application's, and two or more are not ``cls``'s; "" otherwise.
    Without it, each of those keys was an "Extra inputs are not permitted" of its own, with no word of what
    had happened."""
    section = data.get("app")
    own_cls = cls.model_fields["app"].annotation
    if not isinstance(section, dict) or not section or not isinstance(own_cls, type):
        return ""
    unknown = sorted(set(section) - set(own_cls.model_fields))
    if len(unknown) < 2:  # one stray key keeps its own message (and its "did you mean")
        return ""
    from tasks.apps import load_all

    own = own_cls.name
    others = [name for name, a in load_all().items()
              if name != own and set(section) <= set(a.RunConfig.model_fields["app"].annotation.model_fields)]
    if not others:
        return ""
    return (f"invalid configuration: the app section holds settings of {' or '.join(others)}, not of {own} "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): a config written for "
            f"`aeflow run {others[0]}`? (`aeflow run {own} --show-config` lists {own}'s)")


def annotated_yaml(config: BaseModel) -> str:
    """``config`` as YAML with every key, its value and its description as a comment: what ``--set`` and
    ``--config`` accept, and itself a valid ``--config`` file (values in JSON flow style, which YAML reads)."""
    import json

    unused = set(getattr(config, "UNUSED", ()))

    def lines(model: BaseModel, indent: int, prefix: str = "") -> list[str]:
        out = []
        pad = " " * indent
        dumped = model.model_dump(mode="json")
        for name, field in type(model).model_fields.items():
            if prefix + name in unused:  # settings the application never reads (RunConfig.UNUSED)
                continue
            value = getattr(model, name)
            note = f"  # {' '.join(field.description.split())}" if field.description else ""
            if isinstance(value, BaseModel):
                out.append(f"{pad}{name}:{note}")
                out += lines(value, indent + 2, f"{prefix}{name}.")
            else:
                out.append(f"{pad}{name}: {json.dumps(dumped[name], ensure_ascii=False)}{note}")
        return out

    return "\n".join(lines(config, 0)) + "\n"
