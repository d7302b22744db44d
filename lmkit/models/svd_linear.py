"""The adaptive-SVD linear layer of seed 003 (SEEDS_SPEC 2.1), with the seed's two bugs fixed.

:class:`AdaptiveSVDLinear` wraps an existing ``nn.Linear`` (the same ``weight`` Parameter, so an
optimizer built before the swap stays valid) and trains in one of two modes:

* ``full``: ``y = x W^T + b``, ``W`` (out x in) trainable;
* ``lowrank``: ``y = x (W_p + B A)^T + b`` with ``W_p`` (out x in) a frozen buffer holding the top
  ``k = g - r`` singular components and ``B`` (out x r), ``A`` (r x in) trainable, initialised from
  the bottom ``r`` components (MiLoRA: Wang et al. 2024, arXiv 2406.09044), so that
  ``W_p + B A`` equals ``W`` at the switch; ``g = min(out, in)``. ``W`` is kept, frozen, unused.

Fixes: (1) the gradient of the *effective* weight exists in both modes (:meth:`effective_grad`;
in low-rank mode a tensor hook on the materialised ``W_p + B A``), so every metric exists in both
modes and a low-rank layer can switch back; (2) a new ``r`` re-factors ``W_p``, ``B``, ``A`` from
the current effective weight (:meth:`~AdaptiveSVDLinear.refactor`), where the seed only recorded
the number.

Mode, ``r``, factors and the last SVD snapshot are parameters and persistent buffers, so a
checkpoint carries them; the load adapter registered here rebuilds a fresh model's layers at the
checkpoint's shapes before ``load_state_dict`` (:func:`lmkit.models.base.register_load_adapter`).
The decision policy is :mod:`lmkit.models.svd_policy`; the driver is ``lmkit.training.svd``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.errors import ConfigError, TrainingError
from lmkit.models.base import register_load_adapter

__all__ = ["MODES", "AdaptiveSVDLinear", "fold_svd_layers", "has_svd", "svd", "svd_device_for", "svdvals"]

#: Mode names by their code in the ``svd_mode`` buffer.
MODES = ("full", "lowrank")

SVDTriple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# --- SVD routing ------------------------------------------------------------------------------


def has_svd(device: torch.device) -> bool:
    """Whether ``torch.linalg.svd`` has a kernel on ``device``'s type (Apple MPS has none:
    ``aten::_linalg_svd.U`` is not implemented there, the seed's Phase-1 error)."""
    return torch.device(device).type != "mps"


def svd_device_for(device: torch.device | str, requested: str = "auto") -> torch.device:
    """Where an SVD of a tensor on ``device`` runs.

    Args:
        device: the tensor's device.
        requested: ``"auto"`` (the tensor's device), ``"cpu"``, or a device name (``"cuda:0"``).
            A device without an SVD kernel (:func:`has_svd`) is replaced by the CPU.

    Raises:
        ConfigError: ``requested`` is not a device name.
    """
    if requested == "auto":
        target = torch.device(device)
    else:
        try:
            target = torch.device(requested)
        except (RuntimeError, TypeError):
            raise ConfigError(f"svd.svd_device: {requested!r} is not a device (use auto, cpu or e.g. cuda:0)") from None
    return target if has_svd(target) else torch.device("cpu")


def _prepare(w: torch.Tensor, device: str) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"SVD needs a matrix, got shape {tuple(w.shape)}")
    return w.detach().to(device=svd_device_for(w.device, device), dtype=torch.float32)


def svd(w: torch.Tensor, device: str = "auto") -> SVDTriple:
    """Thin SVD ``w = U diag(S) Vh`` in float32: ``U`` (m x g), ``S`` (g, descending), ``Vh``
    (g x n), ``g = min(m, n)`` (``torch.linalg.svd(full_matrices=False)``).

    Runs on ``w``'s device, or where ``device`` says (:func:`svd_device_for`: the CPU for a
    device without SVD, e.g. MPS); the results are moved back to ``w.device``, so training
    never leaves its device. ``w`` is not modified and no gradient flows.

    Raises:
        TrainingError: ``w`` has non-finite entries (the SVD cannot converge).
        ConfigError: ``device`` is not a device name.
    """
    x = _prepare(w, device)
    try:
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError as exc:
        raise TrainingError(f"SVD of a {tuple(w.shape)} matrix failed: {str(exc).splitlines()[0]}") from None
    # contiguous: LAPACK returns column-major U; a layout that a checkpoint round trip would change
    # makes later matmuls differ in the last bit (resume must be bitwise)
    return U.to(w.device).contiguous(), S.to(w.device).contiguous(), Vh.to(w.device).contiguous()


def svdvals(w: torch.Tensor, device: str = "auto") -> torch.Tensor:
    """Singular values of ``w`` (descending, float32), routed like :func:`svd`.

    Raises:
        TrainingError: non-finite entries.
    """
    x = _prepare(w, device)
    try:
        S = torch.linalg.svdvals(x)
    except torch.linalg.LinAlgError as exc:
        raise TrainingError(f"SVD of a {tuple(w.shape)} matrix failed: {str(exc).splitlines()[0]}") from None
    return S.to(w.device)


# --- the layer --------------------------------------------------------------------------------


class AdaptiveSVDLinear(nn.Module):
    """A linear layer that trains either its full weight or a frozen-principal + trainable-minor
    factorisation of it (SEEDS_SPEC 2.1; module docstring).

    Built from an ``nn.Linear``, whose ``weight`` (and ``bias``) Parameter objects it takes over;
    it starts in ``full`` mode and computes exactly what the linear did.

    Attributes:
        in_features, out_features: the shapes, as ``nn.Linear``.
        weight: ``W`` (out x in), the linear's Parameter; trainable in full mode only.
        bias: the linear's bias Parameter or ``None`` (trainable in both modes).
        lora_B, lora_A: ``B`` (out x r), ``A`` (r x in), Parameters; ``None`` until the first
            switch to low-rank, then trainable in low-rank mode only.
        weight_principal: buffer ``W_p`` (out x in), ``None`` until the first switch.
        svd_U, svd_S, svd_Vh: the last snapshot (:meth:`update_snapshot`), float32 buffers
            (out x g), (g,), (g x in); ``None`` before the first.
        svd_mode, svd_r: int64 0-d buffers: mode code (0 full, 1 lowrank) and ``r`` (-1 unset).
        capture_grad: while true, low-rank forwards accumulate the gradient of ``W_p + B A``
            into ``effective_grad_buffer`` (:meth:`effective_grad`). Off by default.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"AdaptiveSVDLinear wraps an nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # the same Parameter object
        self.register_parameter("bias", linear.bias)
        self.register_parameter("lora_B", None)
        self.register_parameter("lora_A", None)
        self.register_buffer("weight_principal", None)
        device = linear.weight.device
        self.register_buffer("svd_mode", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("svd_r", torch.full((), -1, dtype=torch.int64, device=device))
        self.register_buffer("svd_U", None)
        self.register_buffer("svd_S", None)
        self.register_buffer("svd_Vh", None)
        self.capture_grad = False
        self.effective_grad_buffer: torch.Tensor | None = None
        # Python copies of the two int buffers: reading a CUDA buffer in every forward would sync.
        self._mode_code = 0
        self._r: int | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"full"`` or ``"lowrank"``."""
        return MODES[self._mode_code]

    @property
    def r(self) -> int | None:
        """Minor (trainable low-rank) components of the current or last factorisation; ``None``
        before the first switch to low-rank."""
        return self._r

    @property
    def rank_limit(self) -> int:
        """``g = min(out_features, in_features)``, the number of singular values."""
        return min(self.in_features, self.out_features)

    @property
    def snapshot(self) -> SVDTriple | None:
        """The last snapshot ``(U, S, Vh)`` or ``None``."""
        if self.svd_U is None or self.svd_S is None or self.svd_Vh is None:
            return None
        return self.svd_U, self.svd_S, self.svd_Vh

    def _set_state(self, code: int, r: int | None) -> None:
        self._mode_code, self._r = code, r
        with torch.no_grad():
            self.svd_mode.fill_(code)
            self.svd_r.fill_(-1 if r is None else r)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.svd_mode.device.type != "meta":
            code, r = int(self.svd_mode), int(self.svd_r)
            if code != self._mode_code and code in (0, 1):
                self._set_trainable(code)
            self._mode_code, self._r = code, (None if r < 0 else r)

    def _set_trainable(self, code: int) -> None:
        self.weight.requires_grad_(code == 0)
        for p in (self.lora_B, self.lora_A):
            if p is not None:
                p.requires_grad_(code == 1)

    def extra_repr(self) -> str:
        r = f", r={self._r}" if self._r is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}{r}")

    # -- forward and the effective weight ----------------------------------------------------

    def _lowrank_weight(self) -> torch.Tensor:
        """``W_p + B A`` with autograd to ``B`` and ``A``; B A in the weights' dtype even under
        autocast, so the effective weight is as precise as a full weight (autocast then casts
        it inside ``F.linear`` as it would ``W``)."""
        device_type = self.lora_B.device.type
        if device_type in ("cuda", "cpu", "mps", "xpu") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.weight_principal + self.lora_B @ self.lora_A
        return self.weight_principal + self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``: ``x W^T + b`` (full) or ``x (W_p + B A)^T + b`` (low-rank)."""
        if self._mode_code == 0:
            return F.linear(x, self.weight, self.bias)
        w = self._lowrank_weight()
        if self.capture_grad and w.requires_grad:
            w.register_hook(self._accumulate_grad)
        return F.linear(x, w, self.bias)

    def _accumulate_grad(self, grad: torch.Tensor) -> None:
        with torch.no_grad():
            if self.effective_grad_buffer is None:
                self.effective_grad_buffer = grad.detach().clone()
            else:
                self.effective_grad_buffer.add_(grad)

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward multiplies by, out x in, detached (a new tensor): ``W`` in
        full mode, ``W_p + B A`` in low-rank mode."""
        with torch.no_grad():
            if self._mode_code == 0:
                return self.weight.detach().clone()
            return self._lowrank_weight().detach()

    def effective_grad(self) -> torch.Tensor | None:
        """``dL/dW_eff`` (out x in) of the effective weight, or ``None`` when nothing was captured.

        Full mode: ``weight.grad`` (as the trainer left it, e.g. after clipping). Low-rank mode:
        the sum over micro-batches of the gradient reaching ``W_p + B A`` in the forwards run
        while :attr:`capture_grad` was on, since the last :meth:`reset_effective_grad`. That one
        is the raw gradient: global-norm clipping and loss scaling rescale a gradient by one
        positive factor, which the alignments of SEEDS_SPEC 2.2 (norm ratios) do not see; only
        ``grad_norm`` then differs by that factor.
        """
        if self._mode_code == 0:
            return self.weight.grad
        return self.effective_grad_buffer

    def reset_effective_grad(self) -> None:
        """Forget the captured low-rank gradient (call before the micro-batches of a step)."""
        self.effective_grad_buffer = None

    def matmul_params(self) -> int:
        """Weights one token is multiplied by: ``out x in`` in both modes (the low-rank forward
        multiplies by the materialised ``W_p + B A``), for FLOPs per token."""
        return self.in_features * self.out_features

    # -- mode changes --------------------------------------------------------------------------

    def _check_r(self, r: int) -> int:
        g = self.rank_limit
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= g - 1:
            raise ValueError(f"r must be an int in [1, {g - 1}] for a {self.out_features}x{self.in_features} layer, "
                             f"got {r!r}")
        return r

    def _svd_of_effective(self, svd_arg: str | SVDTriple | None) -> SVDTriple:
        if svd_arg is None or isinstance(svd_arg, str):
            return svd(self.effective_weight(), svd_arg or "auto")
        U, S, Vh = svd_arg
        g = self.rank_limit
        if tuple(U.shape) != (self.out_features, g) or tuple(S.shape) != (g,) or tuple(Vh.shape) != (g, self.in_features):
            raise ValueError(f"svd= triple has shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)}; this "
                             f"layer needs ({self.out_features}, {g}), ({g},), ({g}, {self.in_features})")
        return U, S, Vh

    def _factorise(self, r: int, svd_arg: str | SVDTriple | None) -> None:
        """Set ``W_p``, ``B``, ``A`` at ``r`` from the SVD of the current effective weight."""
        W = self.effective_weight()
        U, S, Vh = self._svd_of_effective(svd_arg)
        k = self.rank_limit - r
        dtype, device = self.weight.dtype, self.weight.device
        root = S[k:].clamp_min(0).sqrt()
        B = (U[:, k:] * root).to(device=device, dtype=dtype).contiguous()
        A = (root[:, None] * Vh[k:]).to(device=device, dtype=dtype).contiguous()
        with torch.no_grad():
            # W_p = U_k diag(S_k) Vh_k up to the SVD's float32 rounding; taken as W - B A so that
            # W_p + B A reproduces W to one rounding instead of to the SVD's accuracy.
            self.weight_principal = (W - B @ A).to(dtype)
        self.lora_B = nn.Parameter(B, requires_grad=True)
        self.lora_A = nn.Parameter(A, requires_grad=True)
        self.effective_grad_buffer = None

    def switch_to_lowrank(self, r: int, svd: str | SVDTriple | None = "auto") -> None:
        """Freeze the top ``k = g - r`` components of the effective weight and train ``r``
        (SEEDS_SPEC 2.1): thin SVD ``W = U S Vh``; ``W_p = U[:, :k] S[:k] Vh[:k]`` (frozen),
        MiLoRA init ``B = U[:, k:] diag(sqrt S[k:])``, ``A = diag(sqrt S[k:]) Vh[k:]`` (new
        trainable Parameters); ``weight.requires_grad = False`` and ``weight.grad = None``.
        The output is unchanged (``W_p + B A == W`` to float rounding). The snapshot is not
        touched (:meth:`update_snapshot`); the optimizer must be rebuilt (new Parameters).

        Args:
            r: minor components, ``1 <= r <= g - 1``.
            svd: where the SVD runs (:func:`svd`'s ``device``), or an ``(U, S, Vh)`` of the
                current effective weight already computed (e.g. by the analysis).

        Raises:
            ValueError: already low-rank (use :meth:`refactor`), or a bad ``r`` / triple.
        """
        if self._mode_code == 1:
            raise ValueError(f"layer is already low-rank (r={self._r}); use refactor(r) to change r")
        r = self._check_r(r)
        self._factorise(r, svd)
        self.weight.requires_grad_(False)
        self.weight.grad = None
        self._set_state(1, r)

    def switch_to_full(self) -> None:
        """Fold the factors back and train the full weight (SEEDS_SPEC 2.1): ``W <- W_p + B A``
        in place (the same Parameter), ``W`` trainable; ``B``, ``A`` kept but frozen, their grads
        dropped. ``r`` keeps its last value.

        Raises:
            ValueError: already full.
        """
        if self._mode_code == 0:
            raise ValueError("layer is already in full mode")
        with torch.no_grad():
            self.weight.copy_(self._lowrank_weight())
        self.weight.requires_grad_(True)
        for p in (self.lora_B, self.lora_A):
            p.requires_grad_(False)
            p.grad = None
        self.effective_grad_buffer = None
        self._set_state(0, self._r)

    def refactor(self, r: int, svd: str | SVDTriple | None = "auto") -> None:
        """Re-factor at a new ``r`` from the current effective weight ``W_p + B A`` (the seed only
        recorded the new r): new ``W_p``, ``B`` (out x r), ``A`` (r x in) exactly as
        :meth:`switch_to_lowrank`; the output is unchanged. The optimizer must be rebuilt.

        Raises:
            ValueError: not in low-rank mode, or a bad ``r``.
        """
        if self._mode_code != 1:
            raise ValueError("refactor(r) needs low-rank mode; in full mode switch_to_lowrank(r) sets r")
        r = self._check_r(r)
        self._factorise(r, svd)
        self._set_state(1, r)

    def update_snapshot(self, svd: str | SVDTriple | None = "auto") -> SVDTriple:
        """Take the SVD of the effective weight as the snapshot the next analysis compares with
        (the seed's ``update_svd_tracking``); returns ``(U, S, Vh)`` (float32, on the layer's
        device). ``svd``: as in :meth:`switch_to_lowrank`."""
        U, S, Vh = self._svd_of_effective(svd)
        device = self.weight.device
        self.svd_U, self.svd_S, self.svd_Vh = (t.detach().to(device=device, dtype=torch.float32) for t in (U, S, Vh))
        return self.svd_U, self.svd_S, self.svd_Vh

    # -- checkpoints -------------------------------------------------------------------------

    def fit_state(self, state: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Give this layer the structure of a checkpoint's layer at ``prefix`` (``"name."``):
        create, resize or drop ``lora_B``, ``lora_A``, ``weight_principal`` and the snapshot to
        the checkpoint's shapes (values come from ``load_state_dict``), set mode, ``r`` and
        ``requires_grad`` from its ``svd_mode`` / ``svd_r``."""
        device = self.weight.device
        for name in ("lora_B", "lora_A", "weight_principal", "svd_U", "svd_S", "svd_Vh"):
            ref = state.get(prefix + name)
            current = getattr(self, name)
            if ref is None:
                setattr(self, name, None)
                continue
            if current is not None and current.shape == ref.shape and current.dtype == ref.dtype:
                continue
            fresh = torch.zeros(ref.shape, dtype=ref.dtype, device=device)
            setattr(self, name, nn.Parameter(fresh) if name.startswith("lora_") else fresh)
        code = int(state[prefix + "svd_mode"])
        r = int(state[prefix + "svd_r"]) if prefix + "svd_r" in state else -1
        if code not in (0, 1):
            raise ValueError(f"{prefix}svd_mode is {code}, not 0 (full) or 1 (lowrank)")
        self._set_trainable(code)
        self._set_state(code, None if r < 0 else r)


@register_load_adapter
def _adapt_svd_layers(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter: every ``<name>.svd_mode`` key of ``state`` makes ``<name>`` an
    :class:`AdaptiveSVDLinear` with the checkpoint's shapes, mode and trainability (a plain
    checkpoint changes nothing)."""
    suffix = ".svd_mode"
    for key in list(state):
        if not key.endswith(suffix):
            continue
        name = key[: -len(suffix)]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # load_state_dict reports the mismatch
        if isinstance(module, nn.Linear):
            module = AdaptiveSVDLinear(module)
            _swap(model, name, module)
        if isinstance(module, AdaptiveSVDLinear):
            module.fit_state(state, name + ".")


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    swap = getattr(model, "swap_module", None)
    if callable(swap):
        swap(name, module)
        return
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def fold_svd_layers(model: nn.Module) -> int:
    """Replace every :class:`AdaptiveSVDLinear` in ``model`` by a plain ``nn.Linear`` holding
    its effective weight (``W`` or ``W_p + B A``, a new trainable Parameter) and the same bias
    Parameter: for export and anything that needs a plain weight. The outputs are unchanged and
    the state dict has the keys of the plain model. Returns how many layers were folded."""
    names = [n for n, m in model.named_modules() if isinstance(m, AdaptiveSVDLinear) and n]
    for name in names:
        layer = model.get_submodule(name)
        plain = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=False,
                                   device=layer.weight.device, dtype=layer.weight.dtype)
        plain.weight = nn.Parameter(layer.effective_weight())
        plain.bias = layer.bias
        _swap(model, name, plain)
    return len(names)
