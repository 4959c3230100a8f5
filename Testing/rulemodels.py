"""A rule-based interactive method whose answer is known exactly, for the interactive tests.

:class:`PromptRuleMethod` answers "organ" where the previous mask says so or a positive click's map
is at least 0.5 (within half the click radius, in 3D), and "not organ" where a negative click's map
is at least 0.5; with a box, nothing outside it. So every expected voxel can be computed from the
geometry alone. Config options: ``noise`` (samples that differ, for a variance), ``delay_s`` (seconds
each sampling call sleeps: a correction slow enough to cancel).

Importing this module registers the method; a worker process that must load a package of it imports
this module first (see :func:`worker_command`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from MedDiffSegLib.interactive.prompts import BOX, NEGATIVE, POSITIVE, PREVIOUS
from MedDiffSegLib.methods.base import Method, register_method
from MedDiffSegLib.preprocessing import PreprocessSpec
from MedDiffSegLib.registry import DEFAULT_INFERENCE, ModelPackage, save_package

from tinymodels import TINY_ORGANS

TESTING = Path(__file__).resolve().parent
RADIUS = 30.0  # mm: a positive click marks the ball of radius 15 mm around it


@register_method
class PromptRuleMethod(Method):
    name = "test-prompt-rule"

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("dummy", torch.zeros(1))
        self.condition_calls = 0
        self.seen_prompts: list[torch.Tensor] = []

    def condition(self, images):
        self.condition_calls += 1
        return images.clone()

    def sample(self, cond, organ_ids, num_samples, steps, generator, scheduler=None, prompts=None):
        assert prompts is not None and prompts.shape[1] == 4
        if self.config.get("delay_s"):
            time.sleep(float(self.config["delay_s"]))
        self.seen_prompts.append(prompts.clone())
        p = ((prompts[:, PREVIOUS] > 0) | (prompts[:, POSITIVE] >= 0.5)) & ~(prompts[:, NEGATIVE] >= 0.5)
        if bool((prompts[:, BOX] != 0).any()):
            p = p & (prompts[:, BOX] > 0)
        p = p.float()[:, None].expand(-1, num_samples, -1, -1).clone()
        if self.config.get("noise"):
            eps = torch.rand(p.shape, generator=generator) * 0.2
            p = (p * 0.8 + eps).clamp(0, 1)
        return p

    def training_loss(self, *a, **k):  # pragma: no cover
        raise NotImplementedError


def rule_inference(radius: float | None = RADIUS, roi: int = 16) -> dict:
    inf = dict(DEFAULT_INFERENCE)
    inf.update({"roi_size": [roi, roi], "overlap": 0.25, "samples": 1, "steps": 1, "sw_batch_size": 4})
    if radius is not None:
        inf["click_radius_mm"] = radius
    return inf


def rule_package(tmp_path: Path, prompt_channels: int = 4, radius: float | None = RADIUS, roi: int = 16, **config):
    """An in-memory package of the rule method (no weights file) and the method itself."""
    cfg = {"num_organs": 2, "prompt_channels": prompt_channels, **config}
    pkg = ModelPackage(path=tmp_path, name="test-prompt-rule-model", version="0", method_name="test-prompt-rule",
                       config=cfg, organs=list(TINY_ORGANS),
                       preprocessing=PreprocessSpec(modality="CT", spacing=(2.0, 2.0)),
                       inference=rule_inference(radius, roi), weights_sha256="0" * 64)
    return pkg, PromptRuleMethod(cfg)


def save_rule_package(folder: Path, *, prompt_channels: int = 4, radius: float | None = RADIUS, roi: int = 64,
                      spacing=(2.0, 2.0), name: str = "test-prompt-rule-model", **config) -> ModelPackage:
    """A package folder of the rule method (model.json + weights), as a worker process loads it."""
    cfg = {"num_organs": 2, "prompt_channels": prompt_channels, **config}
    return save_package(folder, PromptRuleMethod(cfg), name=name, version="0.0.1", organs=list(TINY_ORGANS),
                        preprocessing=PreprocessSpec(modality="CT", spacing=tuple(spacing)),
                        inference=rule_inference(radius, roi), description="rule-based interactive test model")


def worker_command(module: str, python: str | None = None) -> list[str]:
    """``python -m MODULE`` for a worker process that knows the rule method (this module imported first)."""
    code = (f"import sys, runpy; sys.path.insert(0, {str(TESTING)!r}); import rulemodels; "
            f"sys.argv[0] = {module!r}; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [python or sys.executable, "-u", "-c", code]
