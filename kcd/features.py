"""Capture named intermediate feature maps with forward hooks, leaving model code untouched.

A *layer spec* names what to capture:

- ``"<path>"``: the output of the submodule at ``<path>``, a name from
  ``model.named_modules()`` such as ``"layer3"``, ``"layer4.1"`` or ``"features.18"``.
- ``"<path>:pre_relu"``: the input of the last activation (``nn.ReLU`` or ``nn.ReLU6``)
  executed inside that submodule during its forward, i.e. the pre-activation output of a
  stage's last block. The paper distils before the ReLU on COCO (Section 4.1).

Paths always refer to the unwrapped model: a wrapper with a ``.module`` attribute
(``DistributedDataParallel``) is resolved through it.

Example::

    with FeatureTap(model, ["layer3"]) as tap:
        logits = model(images)
        feats = tap.features["layer3"]  # b x c x h x w, part of the autograd graph
"""
from __future__ import annotations

import difflib
from functools import partial
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kcd.errors import KcdError

PRE_RELU = "pre_relu"
"""Spec suffix (after ``:``) selecting the input of the last activation inside a module."""

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return ``model.module`` for wrappers such as DistributedDataParallel, else ``model``."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _parse_spec(spec: str) -> tuple[str, bool]:
    """Split a layer spec into its module path and whether it asks for the pre-ReLU value."""
    if not isinstance(spec, str):
        raise KcdError(f"layer spec must be a string such as 'layer3', got {spec!r}")
    path, sep, suffix = spec.partition(":")
    if sep and suffix != PRE_RELU:
        raise KcdError(f"unknown suffix ':{suffix}' in layer spec '{spec}'; the only suffix is ':{PRE_RELU}'")
    if not path:
        raise KcdError(f"layer spec '{spec}' has an empty module path; use a name such as 'layer3'")
    return path, bool(sep)


def _activations(module: nn.Module) -> list[nn.Module]:
    """The ReLU/ReLU6 modules inside ``module`` (itself included)."""
    return [m for m in module.modules() if isinstance(m, _ACTIVATIONS)]


def resolve_layer(model: nn.Module, spec: str) -> nn.Module:
    """Return the submodule a layer spec refers to, checking that the spec can be captured.

    Raises:
        KcdError: malformed spec, unknown module path (the message lists close and
            top-level names), or ``:pre_relu`` on a module without a ReLU/ReLU6 inside.
    """
    root = unwrap_model(model)
    path, pre_relu = _parse_spec(spec)
    modules = dict(root.named_modules())
    if path not in modules:
        names = [name for name in modules if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}; " if close else ""
        top = ", ".join(name for name, _ in root.named_children())
        raise KcdError(
            f"unknown layer '{path}' in {type(root).__name__}; {hint}top-level modules: {top}"
        )
    module = modules[path]
    if pre_relu and not _activations(module):
        raise KcdError(
            f"layer spec '{spec}': module '{path}' ({type(module).__name__}) contains no "
            f"ReLU/ReLU6, so it has no pre-ReLU value; drop ':{PRE_RELU}'"
        )
    return module


class FeatureTap:
    """Record the features named by layer specs at every forward of ``model``.

    Use as a context manager (hooks are removed on exit) or keep the object and call
    :meth:`remove` when done. :attr:`features` holds the tensors of the latest forward
    only; they stay in the autograd graph, so losses on them train the model. The model's
    outputs are unchanged by the hooks.

    For ``:pre_relu`` specs, an in-place activation is given a copy of its input to work
    on, so the recorded pre-activation tensor stays intact.

    Args:
        model: the model, or a DistributedDataParallel-style wrapper of it.
        layers: layer specs (see the module docstring); duplicates are ignored.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        if isinstance(layers, str) or not layers:
            raise KcdError(f"layers must be a non-empty list of layer specs, got {layers!r}")
        root = unwrap_model(model)
        self.layers: list[str] = list(dict.fromkeys(layers))
        targets = [(spec, resolve_layer(root, spec), _parse_spec(spec)[1]) for spec in self.layers]

        self._features: dict[str, Any] = {}
        self._versions: dict[str, int] = {}
        # pre-ReLU specs whose module is running -> latest activation input seen inside it
        self._open: dict[str, Tensor | None] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = [
            root.register_forward_pre_hook(self._start_forward)
        ]
        specs_of_activation: dict[nn.Module, list[str]] = {}
        for spec, module, pre_relu in targets:
            if pre_relu:
                self._handles.append(module.register_forward_pre_hook(partial(self._open_spec, spec)))
                for activation in _activations(module):
                    specs_of_activation.setdefault(activation, []).append(spec)
            self._handles.append(module.register_forward_hook(partial(self._capture, spec, pre_relu)))
        for activation, specs in specs_of_activation.items():
            self._handles.append(
                activation.register_forward_pre_hook(partial(self._record_activation_input, tuple(specs)))
            )

    @property
    def features(self) -> dict[str, Tensor]:
        """Spec -> captured tensor from the latest forward (empty before the first one).

        Raises:
            KcdError: a captured tensor was modified in place after capture (e.g. by a
                following ``ReLU(inplace=True)``), so it no longer holds the module output.
        """
        for spec, value in self._features.items():
            if spec in self._versions and value._version != self._versions[spec]:
                raise KcdError(
                    f"feature '{spec}' was modified in place after capture (e.g. by an in-place "
                    f"activation that follows it); tap the enclosing module with ':{PRE_RELU}' "
                    "or a layer after the activation"
                )
        return dict(self._features)

    def remove(self) -> None:
        """Remove all hooks; the features of the last forward stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._open.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _start_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Drop the previous forward's tensors so they are not kept alive."""
        self._features = {}
        self._versions = {}
        self._open.clear()

    def _open_spec(self, spec: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Start watching the activations inside the module of a pre-ReLU spec."""
        self._open[spec] = None

    def _record_activation_input(
        self, specs: tuple[str, ...], module: nn.Module, args: tuple[Any, ...]
    ) -> tuple[Any, ...] | None:
        """Keep the activation's input for the open specs; shield it from in-place activations."""
        open_specs = [spec for spec in specs if spec in self._open]
        if not open_specs:
            return None
        value = args[0]
        for spec in open_specs:
            self._open[spec] = value
        if getattr(module, "inplace", False):
            return (value.clone(), *args[1:])
        return None

    def _capture(self, spec: str, pre_relu: bool, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Store the module output, or the last activation input seen during its forward."""
        if pre_relu:
            value = self._open.pop(spec, None)
            if value is None:
                raise KcdError(f"layer spec '{spec}': no ReLU/ReLU6 ran inside the module during its forward")
        else:
            value = output
        self._features[spec] = value
        if isinstance(value, Tensor) and not value.is_inference():
            self._versions[spec] = value._version


def global_avg_pool(x: Tensor) -> Tensor:
    """Average a ``b x c x h x w`` feature map over space to ``b x c``; ``b x c`` passes through."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 2:
        return x
    raise KcdError(f"global_avg_pool expects a b x c x h x w or b x c tensor, got shape {tuple(x.shape)}")


def feature_shapes(
    model: nn.Module,
    layers: Sequence[str],
    input_size: int | tuple[int, int],
    batch: int = 2,
) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (``(c, h, w)`` for feature maps) of the given layer specs.

    Runs one forward on zeros of shape ``batch x 3 x H x W`` (``input_size`` is ``H = W``
    or ``(H, W)``), in eval mode without gradients, on the model's device and dtype; the
    train/eval mode of every submodule is restored afterwards.
    """
    root = unwrap_model(model)
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    reference = next(root.parameters(), torch.empty(0))
    x = torch.zeros(batch, 3, height, width, device=reference.device, dtype=reference.dtype)
    modes = {module: module.training for module in root.modules()}
    try:
        root.eval()
        with torch.no_grad(), FeatureTap(root, layers) as tap:
            root(x)
            features = tap.features
    finally:
        for module, training in modes.items():
            module.training = training
    return {spec: tuple(features[spec].shape[1:]) for spec in tap.layers}
