"""Fixed-seed outputs of every method's tiny model, bit for bit (a guard for refactoring the Method seam).

For each method: samples (one step, several steps with the default scheduler, several steps with
DDPM, whose step noise comes from the generator too) and the training loss terms of each stage,
from a tiny random model built with a fixed seed; for the methods with interactive prompts also
with prompts. Each result's sha256 (the float32 bytes; loss terms as their exact ``float.hex``) was
recorded on the code before the methods' shared scaffolding moved onto the Method seam
(``MedDiffSegLib/methods/base.py``, issue #24), so any change in arithmetic or in the order of the
random draws shows here.

The digests are of CPU float32 arithmetic on one thread with the pinned torch (2.13.0 CPU). A CPU
with other vector instructions, or another torch, may round differently in the last bit; then
this test fails although nothing changed, and the message says so (two machines are recorded below): re-record the digests with
``python Testing/lib/test_method_golden.py`` on the old commit and the new one, on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tinymodels, when run as a script

from tinymodels import builtin_methods, tiny_method  # noqa: E402

METHODS = ("dts", "guided", "meddelinea", "medsegdiff_v2", "sdseg")
PROMPTED = ("guided", "sdseg")
H = W = 32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _loss_digest(terms: dict[str, torch.Tensor]) -> str:
    text = json.dumps({k: float(v).hex() for k, v in sorted(terms.items())})
    return hashlib.sha256(text.encode()).hexdigest()


def _inputs(prompt_channels: int = 0):
    g = _gen(123)
    images = torch.rand(2, 1, H, W, generator=g) * 2 - 1
    masks = (torch.rand(2, 1, H, W, generator=g) > 0.5).float()
    prompts = torch.rand(2, prompt_channels, H, W, generator=g) * 2 - 1 if prompt_channels else None
    return images, masks, prompts


def outputs(name: str, prompt_channels: int = 0) -> dict[str, str]:
    """sha256 of each fixed-seed result of method ``name``'s tiny model (seed 0, two organs)."""
    m = tiny_method(name, 2, 0, prompt_channels).eval()
    images, masks, prompts = _inputs(prompt_channels)
    extra = {"prompts": prompts} if prompt_channels else {}
    organs = torch.tensor([1, 0])
    cond = m.condition(images)
    out = {
        "one_step": _digest(m.sample(cond, organs, 2, 1, _gen(5), None, **extra)),
        "three_steps": _digest(m.sample(cond, organs, 2, 3, _gen(6), None, **extra)),
        "ddpm": _digest(m.sample(cond, organs, 3, 2, _gen(7), "ddpm", **extra)),
        # the engine's route: one condition, expanded to two organs per window, then some rows selected
        "expanded": _digest(m.sample(m.select_condition(m.expand_condition(cond, 2), torch.tensor([3, 0, 1])),
                                     torch.tensor([1, 0, 1]), 2, 2, _gen(8), "unipc", **(
                                         {"prompts": prompts[[1, 0, 0]]} if prompt_channels else {}))),
    }
    with torch.no_grad():
        for stage in m.stages:
            out[f"loss_{stage}"] = _loss_digest(m.training_loss(images, masks, organs, _gen(9), stage, **extra))
    return out


def all_outputs() -> dict[str, dict[str, str]]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        found = {name: outputs(name) for name in METHODS}
        found.update({f"{name}+prompts": outputs(name, 4) for name in PROMPTED})
        return found
    finally:
        torch.set_num_threads(before)


#: Recorded on the code before issue #24's refactoring (bb64e77), CPU, one thread, torch 2.13.0.
RECORDED: dict[str, dict[str, str]] = {
    "dts": {
        "one_step": "7c17e1b79b0b3003eec5bcfb183d7f9eb8a1393517d11aa899f733e38ca8ac40",
        "three_steps": "561c31ba5ffd555fbff4885dcbb6bc055ad189db4de19dca5aec3c460fa69c2e",
        "ddpm": "568a222f71a364c82fda7eea7637e5a98bf22aac5a27de855a7d613988baf3fa",
        "expanded": "689f6fc3b2d9a25be541ec942b0660baf9cb6181f3379416e26a337db22b0eea",
        "loss_denoiser": "9b34ba571d7ebeca5e4d5cc478a42e027aa9e40baec6a124dc854b04a6b0460b",
    },
    "guided": {
        "one_step": "c92f5ec50eac634714a02aebdbc4de9e2ae4feccaf3863c2fa1f3c7d57eac8fb",
        "three_steps": "3004bcbb9f572cd385847b0c41c5b39abf7b1e17b5851d80aa64bc9a82a3ae35",
        "ddpm": "e3f36c1122ab609933a76d5e058f2de427e2477cdb7c493fe6bc9ef6afee4a65",
        "expanded": "799a58fa712d1ec2656a0a239e76f15a452ea5f7aa86b67f7e8bc25cf265f159",
        "loss_autoencoder": "7e3ca48bc62c7852d229395f98f83ea64609731554f3c388369822031c3e9d2f",
        "loss_denoiser": "e9835b705cd1224d47a704333ff793dfff2d7957e80ed952dc9e77169e7378ca",
    },
    "meddelinea": {
        "one_step": "c383a0a74f5693c84e98cef6fdb176154758e0e12ea7825339ec293c1d245c1a",
        "three_steps": "4f9fed33084dda156dfab4591dc2c0c0bbab8022dd1ca351fe6275953e2b921d",
        "ddpm": "401ac2992f412db6de2901ba245571f4899a6806110f9c384d3781508b80794b",
        "expanded": "63d6580bdf9fa58dcd17d45dffba73fa3a98261a7e4e28abe682f4ea54020ca6",
        "loss_autoencoder": "83ba380f5f3aeb65e5b70cb5c56249c0ca370f961858b4bcac6946f20eb4c58f",
        "loss_denoiser": "e34ef44d4ad8f12e9bdf70322d20b647ee9d0bd2148db0e2ad5c2c9048162dd6",
    },
    "medsegdiff_v2": {
        "one_step": "9e231cad31d75b7e8378396719321d3a34a5c0a2592824327a399c312505406e",
        "three_steps": "54601f30d274926565d15301c1e526c1157672b0adf917ecd60e5f85e62f8da1",
        "ddpm": "c7475307433c144c76a97c55204cbd72ab03f7a825d7126333c87dfe82784a8d",
        "expanded": "ae8646ccbde936385b2953cb30c456d45094a8970e8946f91b66d2351a738fbb",
        "loss_denoiser": "887dbd2b03431e33743f127aadac56deb67b05b39b3362e3d0335712ad2da584",
    },
    "sdseg": {
        "one_step": "d7af8fa419004476ee8fbd7e3b1ba1a172ca40c023d2803a17b965b408b18948",
        "three_steps": "32e49f95b4cf92a5a3d3748d690f80a1274fc27948a859130987ccdd3cc377cd",
        "ddpm": "0100607cd291a1eebf72238fb9a5383ca76a5182e2e7e192f5df4e255bb05b51",
        "expanded": "7699b77263c6517bfa07ce23f339893942f5a801d32b78226d9b71a3f10aa2e5",
        "loss_autoencoder": "7e3ca48bc62c7852d229395f98f83ea64609731554f3c388369822031c3e9d2f",
        "loss_denoiser": "f740ffe85a8ad19440e9aa9c306e50b3e290a2505b0d3dea31786ae111156870",  # sdseg loss: L1 (the paper's), re-recorded 2026-12-07
    },
    "guided+prompts": {
        "one_step": "22eb2d12ec8675e0745b1a67c7cc00e59d68546ee5a9d34bf74a45d8ca739b3f",
        "three_steps": "f95f19fe015afa0338f077aedc071fd38a87f47d5d413415cd4af4adf906d6e1",
        "ddpm": "7966091387d34e451d526441bba8e41cd78344c618e134bfd23415793a544d39",
        "expanded": "8bbb5ce1da51ecc2022147e31faefc0f23da07879e45c01f4f69654929921251",
        "loss_autoencoder": "7e3ca48bc62c7852d229395f98f83ea64609731554f3c388369822031c3e9d2f",
        "loss_denoiser": "566b7e7131ea3488573909f8dc6ed8824c587fa0234dca24822bc0c6bfc54cef",
    },
    "sdseg+prompts": {
        "one_step": "0c21f2e95af6f2c35d4870047066babe1360f5c5066782d740bc36d8002f5694",
        "three_steps": "ca2e6c1910dcfa481c7e3a5decb126d7435aac730b44e655541a573f61c0c60c",
        "ddpm": "8e366d8b04c9bce00558f0f4bb206e9e3365c43d9bd98d996a29048099009793",
        "expanded": "e54e73bf03885417ccaf7de0d6bd450cee2b624fb914b31564ad1d027b3ee597",
        "loss_autoencoder": "7e3ca48bc62c7852d229395f98f83ea64609731554f3c388369822031c3e9d2f",
        "loss_denoiser": "a738c06134a19c3b292a66b1d5fb97de4b4dfe09f8920e4e77386459b8d2d49c",  # L1 loss, re-recorded 2026-12-07
    },
}


#: The same results on a 2-core Intel Xeon with AVX-512 (torch 2.13.0 CPU, one thread), which rounds differently
#: from the machine that recorded RECORDED: recorded 2026-12-08 with this script on the code of 87fea11 and on
#: that of this change, identical on both (the methods' code was not touched).
RECORDED_AVX512: dict[str, dict[str, str]] = {
    "dts": {
        "one_step": "11befd4c1754213da3d142a8fe0f18b7206a758e32573dd2aa0710c1a7f0ead1",
        "three_steps": "e9f0f2ae533c0a81663478849fa38e370c7b2548595825651cff04473e1f7cfc",
        "ddpm": "887a2fed703ef89def2a09f0b3ce86362be7ed941b63711f0a56ebead27dd7fc",
        "expanded": "3de15e04627e56d8742598cdb6072cf8b9369acf915ae0679e4f4fcdf7a13067",
        "loss_denoiser": "9b34ba571d7ebeca5e4d5cc478a42e027aa9e40baec6a124dc854b04a6b0460b"
    },
    "guided": {
        "one_step": "5674232ba0675d7cf9a4cc36448ea9a70aa5c854b6e0ee367912e3de600dd11e",
        "three_steps": "c68fa037c7dc5c9fe1a8a5d5a28c29104ec941cafceff1e88fa432d693b72dc5",
        "ddpm": "f3d537ea4c01e3ae8dacccf975dac9680e982c730437c7c25d38efaf87fe34c4",
        "expanded": "8dabfbc0576ff20fb2501a1b1df08b5e99e3eaab97d66ce97e7c267e8b1d30b3",
        "loss_autoencoder": "e0741284b141c7ef92434f078b723787309ea1f92f7a4b802360875bc00ad333",
        "loss_denoiser": "f352b1ed3c3bc4425bc2caa0feb012875c7068f52c91a929eee7b7fe744112fb"
    },
    "meddelinea": {
        "one_step": "173e2c1720b33efed099afd3bb8277bd563a26e45a45b6f12d5a02c941da9a07",
        "three_steps": "71ad138640932f1d2b3f8aff66ea2c34efa633ac2d273355b3a584387fad9d71",
        "ddpm": "d256d82bba5849285ee94fe6484be72e2161c237913994aefcedb13d3ec341e1",
        "expanded": "864b5db7070ca778e95b36277c71b1a3898c336809502f6bcd6f00769f113ba0",
        "loss_autoencoder": "79886e7f15dbe5319044b7253060bcdc10003ddaa1450b01dc2f1e3b03be069b",
        "loss_denoiser": "289c63a4f88b1127a7347fa049c2a4ef06b13f0fe8b2a0f7c034183b826fd733"
    },
    "medsegdiff_v2": {
        "one_step": "537b9513853ad8a28a897d2810e31dc413bc5e12ca3eddf415292d162d072e2b",
        "three_steps": "7ab8376af3a43bf9dd03c7132f70984199e76b330355cc16bf6f998155be33fc",
        "ddpm": "49e79dc75a34641c71b7f6869b15cab17253ed482cdf115bb3e770316ff83f08",
        "expanded": "2d7f905b16d88558fbb5a99ca74014362a0fbdccf54a99a04243c7a62ab11c0c",
        "loss_denoiser": "887dbd2b03431e33743f127aadac56deb67b05b39b3362e3d0335712ad2da584"
    },
    "sdseg": {
        "one_step": "ee7098e44df0cfcef36df0b894cfaeecf788f45b5ab01a3b704997fa510878cf",
        "three_steps": "4e4142c41742d3bb9f6c4d4385e7758c9a8e6f78952e3fb4f09c31fe6f98fdb6",
        "ddpm": "792c39b3e0a0c3be4278ac061591a3f52e754b89a84c93e6ad7c67204d0c65fc",
        "expanded": "5a7640064cfa9293208db5d8d03469b9fff943ac360daf78c8e3fc4884edcb82",
        "loss_autoencoder": "e0741284b141c7ef92434f078b723787309ea1f92f7a4b802360875bc00ad333",
        "loss_denoiser": "f740ffe85a8ad19440e9aa9c306e50b3e290a2505b0d3dea31786ae111156870"
    },
    "guided+prompts": {
        "one_step": "d3d86192367572e1bd6acf09c3168938f9c11ae86c80b27ebb786e66ec28d322",
        "three_steps": "c6dc732122bbb872a51d30a6e774c577ff0874ae6a11ca21bfffc7cfffa90aca",
        "ddpm": "440ab8605addb50543487a3fb59774bbe6efca4988853cd798ce34dad64eec9f",
        "expanded": "d8d06433b2dadf13452422f7c7cc1d399b78e85b672701c6e4268efc4634ed7d",
        "loss_autoencoder": "e0741284b141c7ef92434f078b723787309ea1f92f7a4b802360875bc00ad333",
        "loss_denoiser": "807b032f34a2e70430aa92bc72a0c0493c2f33d5564b01e1b9b05cde7b11b655"
    },
    "sdseg+prompts": {
        "one_step": "828d5fc969807590a72d124b4262195cd9c8b59257b79f867cb3ccf35f12b7a4",
        "three_steps": "0ca4d0431dd37eca01f91d451d330d1df77cd36cfa04c0084bedd6506344bd12",
        "ddpm": "4c8095871b4efe1301c4e7681d896cfee16dadb0bb46ddea0f92dfb70b1d7004",
        "expanded": "6efd455ef5fb4bfe1bc771a1a1668542bba180925143a2065221bd5586813f92",
        "loss_autoencoder": "e0741284b141c7ef92434f078b723787309ea1f92f7a4b802360875bc00ad333",
        "loss_denoiser": "6d82bbfbee1f2ac6e9b5ab7b4fe99bd24806ad3508bc365d77bf22a88acd4e6b"
    }
}


@pytest.fixture(scope="module")
def found():
    return all_outputs()


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_fixed_seed_outputs_are_unchanged(found, case):
    # every result of the case as one machine recorded it (the last bit of float32 differs between CPUs)
    reference = next((r[case] for r in (RECORDED_AVX512, RECORDED) if found[case] == r[case]), RECORDED[case])
    changed = sorted(k for k in reference if found[case].get(k) != reference[k])
    assert not changed, (f"{case}: {', '.join(changed)} differ from the recorded digests. Either the arithmetic "
                         "or the order of the random draws changed, or this CPU/torch rounds differently from the "
                         "one that recorded them (see the module docstring)")
    assert set(found[case]) == set(RECORDED[case])


def test_every_method_is_recorded():
    assert builtin_methods() == sorted(METHODS)
    assert set(RECORDED) == set(RECORDED_AVX512) == set(METHODS) | {f"{n}+prompts" for n in PROMPTED}


if __name__ == "__main__":
    print(json.dumps(all_outputs(), indent=4))
