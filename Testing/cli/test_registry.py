"""Model registry: listing, resolving, installing from zip, exporting, ``meddiffseg models``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.errors import ModelError
from MedDiffSegLib.registry import (
    DEFAULT_MODEL,
    DEFAULT_MODELS,
    FALLBACK_MODELS,
    ModelPackage,
    default_model_for,
    export_zip,
    install_zip,
    list_packages,
    models_for_modality,
    package_origin,
    resolve_model,
    scan_packages,
    sha256_file,
    user_models_dir,
)
from MedDiffSegLib.registry import store
from tinymodels import make_tiny_package


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_pkgs")
    return {m: make_tiny_package(root / f"tiny-{m}", m).path for m in ("guided", "sdseg")}


@pytest.fixture(scope="session")
def tiny_zips(tiny_packages, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_zips")
    return {m: export_zip(ModelPackage.from_folder(p), root / f"tiny-{m}.zip") for m, p in tiny_packages.items()}


@pytest.fixture
def builtin_dir(tmp_path, monkeypatch) -> Path:
    """An empty stand-in for the shipped models folder (the real default model may or may not be there)."""
    d = tmp_path / "builtin_models"
    d.mkdir()
    monkeypatch.setattr(store, "BUILTIN_MODELS_DIR", d)
    return d


def _installed_entries() -> list[str]:
    d = user_models_dir()
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _rezip(src_zip: Path, dst_zip: Path, *, edit=None, extra=()) -> Path:
    """Copy a zip, optionally changing members (edit(name, data) -> data) and adding raw ZipInfo members."""
    with zipfile.ZipFile(src_zip) as zin, zipfile.ZipFile(dst_zip, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if edit is not None:
                data = edit(info.filename, data)
            zout.writestr(info.filename, data)
        for info, data in extra:
            zout.writestr(info, data)
    return dst_zip


# -- listing and resolving ---------------------------------------------------------------------


def test_user_dir_follows_meddiffseg_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFFSEG_HOME", str(tmp_path / "h"))
    assert user_models_dir() == tmp_path / "h" / "models"
    monkeypatch.delenv("MEDDIFFSEG_HOME")
    assert user_models_dir() == Path.home() / ".meddiffseg" / "models"


def test_list_shows_builtin_and_user_packages(builtin_dir, tiny_packages, tiny_zips):
    shutil.copytree(tiny_packages["guided"], builtin_dir / "tiny-guided")
    install_zip(tiny_zips["sdseg"])
    pkgs = {p.name: p for p in list_packages()}
    assert set(pkgs) == {"tiny-guided", "tiny-sdseg"}
    assert package_origin(pkgs["tiny-guided"]) == "built-in"
    assert package_origin(pkgs["tiny-sdseg"]) == "user"
    assert resolve_model("tiny-guided").path == builtin_dir / "tiny-guided"


def test_user_package_shadows_builtin(builtin_dir, tiny_packages, tiny_zips):
    shutil.copytree(tiny_packages["guided"], builtin_dir / "tiny-guided")
    install_zip(tiny_zips["guided"])
    scan = scan_packages()
    assert [p.name for p in scan.packages] == ["tiny-guided"]
    assert package_origin(scan.packages[0]) == "user"
    assert [package_origin(p) for p in scan.shadowed] == ["built-in"]
    assert package_origin(resolve_model("tiny-guided")) == "user"


def test_broken_folders_are_skipped_with_a_warning(builtin_dir, tiny_zips, caplog):
    install_zip(tiny_zips["sdseg"])
    (user_models_dir() / "garbage").mkdir()
    (user_models_dir() / "badjson").mkdir()
    (user_models_dir() / "badjson" / "model.json").write_text("{not json", encoding="utf-8")
    (user_models_dir() / "stray-file.txt").write_text("x", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="MedDiffSegLib.registry.store"):
        names = [p.name for p in list_packages()]
    assert names == ["tiny-sdseg"]
    assert "garbage" in caplog.text and "badjson" in caplog.text
    with pytest.raises(ModelError, match="broken"):
        resolve_model("badjson")


def test_resolve_by_folder_path(tiny_packages):
    pkg = resolve_model(str(tiny_packages["sdseg"]))
    assert pkg.name == "tiny-sdseg" and package_origin(pkg) == "path"
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tiny_packages["sdseg"].parent / "nope"))


def test_unknown_name_lists_installed_and_how_to_install(builtin_dir, tiny_zips):
    install_zip(tiny_zips["guided"])
    with pytest.raises(ModelError) as exc:
        resolve_model("liver-mri-9000")
    msg = str(exc.value)
    assert "'liver-mri-9000' is not installed" in msg and "tiny-guided" in msg
    assert "meddiffseg models install" in msg


# -- defaults per modality ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_mr(tmp_path_factory) -> Path:
    """A tiny package made for MR (preprocessing.modality = MR)."""
    return make_tiny_package(tmp_path_factory.mktemp("tiny_mr") / "tiny-mr", "guided", modality="MR", name="tiny-mr").path


def _as_named(src: Path, folder: Path, name: str) -> Path:
    """A copy of the package at ``src`` renamed ``name`` in ``folder`` (weights unchanged)."""
    dest = shutil.copytree(src, folder / name)
    meta = json.loads((dest / "model.json").read_text())
    meta["name"] = name
    (dest / "model.json").write_text(json.dumps(meta))
    return dest


def test_packages_expose_their_modality(tiny_packages, tiny_mr):
    assert ModelPackage.from_folder(tiny_packages["guided"]).modality == "CT"
    assert ModelPackage.from_folder(tiny_mr).modality == "MR"


def test_default_model_missing_is_a_clear_model_error(builtin_dir):
    for call in (lambda: resolve_model(None), lambda: default_model_for("CT")):
        with pytest.raises(ModelError) as exc:
            call()
        msg = str(exc.value)
        assert msg.startswith("no CT model is installed") and f"'{DEFAULT_MODELS['CT']}'" in msg
        assert "meddiffseg models install" in msg


def test_ct_default_falls_back_to_the_guided_package_until_abdomen_ct_is_installed(builtin_dir, tiny_packages):
    """resolve_model(None) is the CT default: abdomen-ct, else abdomen-ct-guided (the default shipped before it)."""
    assert DEFAULT_MODEL == DEFAULT_MODELS["CT"] == "abdomen-ct" and FALLBACK_MODELS["CT"][0] == "abdomen-ct-guided"
    _as_named(tiny_packages["guided"], builtin_dir, "abdomen-ct-guided")
    _as_named(tiny_packages["sdseg"], builtin_dir, "abdomen-ct-dts")  # another CT model is not picked
    assert resolve_model(None).name == "abdomen-ct-guided"
    assert default_model_for("CT").name == "abdomen-ct-guided"
    _as_named(tiny_packages["sdseg"], builtin_dir, DEFAULT_MODELS["CT"])
    assert resolve_model(None).name == default_model_for("ct").name == "abdomen-ct"


def test_mr_default_needs_an_mr_package(builtin_dir, tiny_packages, tiny_mr, tmp_path):
    _as_named(tiny_packages["guided"], builtin_dir, "abdomen-ct-guided")
    with pytest.raises(ModelError) as exc:
        default_model_for("MR")
    msg = str(exc.value)
    assert msg.startswith("no MR model is installed") and "'abdomen-mr'" in msg and "abdomen-ct-guided (CT)" in msg
    assert "meddiffseg models install" in msg and str(user_models_dir()) in msg
    # a package named like the default but made for CT is not the MR default
    _as_named(tiny_packages["sdseg"], builtin_dir, "abdomen-mr")
    with pytest.raises(ModelError, match="no MR model is installed"):
        default_model_for("MR")
    shutil.rmtree(builtin_dir / "abdomen-mr")
    # the only MR package installed is used ...
    install_zip(export_zip(tiny_mr, tmp_path / "mr.zip"))
    assert default_model_for("MR").name == "tiny-mr"
    assert [p.name for p in models_for_modality("MR")] == ["tiny-mr"]
    assert [p.name for p in models_for_modality("CT")] == ["abdomen-ct-guided"]
    # ... but of several, none is guessed
    _as_named(tiny_mr, builtin_dir, "site-mr")
    with pytest.raises(ModelError, match="several MR models are .*site-mr, tiny-mr.*choose one with --model"):
        default_model_for("MR")
    # the named default wins
    _as_named(tiny_mr, builtin_dir, DEFAULT_MODELS["MR"])
    assert default_model_for("MR").name == "abdomen-mr"
    assert resolve_model(None).name == "abdomen-ct-guided"  # None stays the CT default


# -- install / export --------------------------------------------------------------------------


def test_install_zip_offline_and_verified(builtin_dir, tiny_zips, tiny_packages):
    digest = sha256_file(tiny_zips["sdseg"])
    pkg = install_zip(tiny_zips["sdseg"], sha256=digest.upper())
    assert pkg.path == user_models_dir() / "tiny-sdseg"
    pkg.verify()
    assert sha256_file(pkg.weights_path) == sha256_file(tiny_packages["sdseg"] / "weights.safetensors")
    assert _installed_entries() == ["tiny-sdseg"]  # no staging leftovers


def test_install_zip_with_files_at_root(builtin_dir, tiny_packages, tmp_path):
    z = tmp_path / "flat.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in ("model.json", "weights.safetensors"):
            zf.write(tiny_packages["guided"] / f, f)
    assert install_zip(z).name == "tiny-guided"


def test_install_refuses_overwrite_unless_force(builtin_dir, tiny_zips):
    install_zip(tiny_zips["guided"])
    marker = user_models_dir() / "tiny-guided" / "marker"
    marker.write_text("old", encoding="utf-8")
    with pytest.raises(ModelError, match="already installed.*--force"):
        install_zip(tiny_zips["guided"])
    assert marker.exists()
    install_zip(tiny_zips["guided"], force=True)
    assert not marker.exists()
    assert _installed_entries() == ["tiny-guided"]


def test_install_refuses_bad_zip_hash(builtin_dir, tiny_zips):
    with pytest.raises(ModelError, match="does not match the expected sha256"):
        install_zip(tiny_zips["guided"], sha256="0" * 64)
    with pytest.raises(ModelError, match="64 hexadecimal digits"):
        install_zip(tiny_zips["guided"], sha256="abc")
    assert _installed_entries() == []


@pytest.mark.parametrize("member", ["../evil.txt", "tiny-guided/../../evil.txt", "/tmp/evil-abs.txt", "C:/evil.txt",
                                    "tiny-guided\\..\\..\\evil.txt"])
def test_install_refuses_zip_slip(builtin_dir, tiny_zips, tmp_path, member):
    bad = _rezip(tiny_zips["guided"], tmp_path / "slip.zip", extra=[(zipfile.ZipInfo(member), b"pwned")])
    with pytest.raises(ModelError, match="refusing zip member"):
        install_zip(bad)
    assert _installed_entries() == []
    assert not (user_models_dir().parent / "evil.txt").exists()
    assert not (user_models_dir() / "evil.txt").exists()
    assert not Path("/tmp/evil-abs.txt").exists()


def test_install_refuses_symlink_member(builtin_dir, tiny_zips, tmp_path):
    link = zipfile.ZipInfo("tiny-guided/link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    bad = _rezip(tiny_zips["guided"], tmp_path / "link.zip", extra=[(link, b"/etc/passwd")])
    with pytest.raises(ModelError, match="symbolic link"):
        install_zip(bad)
    assert _installed_entries() == []


def test_install_refuses_weights_not_matching_model_json(builtin_dir, tiny_zips, tmp_path):
    def corrupt(name, data):
        if name.endswith("weights.safetensors"):
            data = bytearray(data)
            data[-1] ^= 0xFF
            return bytes(data)
        return data

    bad = _rezip(tiny_zips["guided"], tmp_path / "corrupt.zip", edit=corrupt)
    with pytest.raises(ModelError, match="does not match its sha256"):
        install_zip(bad)
    assert _installed_entries() == []


def test_install_refuses_zip_without_package(builtin_dir, tmp_path):
    z = tmp_path / "empty.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("README.txt", "hello")
    with pytest.raises(ModelError, match="no model package"):
        install_zip(z)
    notzip = tmp_path / "not.zip"
    notzip.write_text("not a zip", encoding="utf-8")
    with pytest.raises(ModelError, match="not a valid zip"):
        install_zip(notzip)
    with pytest.raises(ModelError, match="not found"):
        install_zip(tmp_path / "missing.zip")
    assert _installed_entries() == []


def test_install_refuses_unsafe_package_name(builtin_dir, tiny_zips, tmp_path):
    def rename(name, data):
        if name.endswith("model.json"):
            meta = json.loads(data)
            meta["name"] = "../escape"
            return json.dumps(meta).encode()
        return data

    bad = _rezip(tiny_zips["guided"], tmp_path / "name.zip", edit=rename)
    with pytest.raises(ModelError, match="not usable as a folder name"):
        install_zip(bad)
    assert _installed_entries() == []


def test_export_refuses_corrupt_package(tiny_packages, tmp_path):
    copy = shutil.copytree(tiny_packages["guided"], tmp_path / "tiny-guided")
    with open(copy / "weights.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ModelError, match="sha256"):
        export_zip(ModelPackage.from_folder(copy), tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_models_list_install_info(builtin_dir, tiny_packages, tiny_zips, capsys):
    shutil.copytree(tiny_packages["guided"], builtin_dir / "tiny-guided")
    digest = sha256_file(tiny_zips["sdseg"])
    assert main(["models", "install", str(tiny_zips["sdseg"]), "--sha256", digest]) == 0
    assert "installed tiny-sdseg 0.0.1" in capsys.readouterr().out

    for argv in (["models"], ["models", "list"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "NAME" in out and "WHERE" in out
        lines = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
        assert "built-in" in lines["tiny-guided"] and "guided" in lines["tiny-guided"]
        assert "user" in lines["tiny-sdseg"] and "liver, spleen" in lines["tiny-sdseg"]
        assert "MODALITY" in out and " CT " in lines["tiny-sdseg"]
        assert "(default)" not in out  # two CT models, neither abdomen-ct nor its fallback
        assert "no default CT model" in out and "no MR model installed" in out

    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {d["name"]: d["origin"] for d in listed} == {"tiny-guided": "built-in", "tiny-sdseg": "user"}
    assert {d["name"]: (d["modality"], d["default_for"]) for d in listed} == {"tiny-guided": ("CT", None),
                                                                             "tiny-sdseg": ("CT", None)}

    assert main(["models", "info", "tiny-sdseg"]) == 0
    out = capsys.readouterr().out
    for text in ("tiny-sdseg 0.0.1 (user)", "method:    sdseg", "modality:  CT\n", "organs:    liver, spleen\n",
                 "input:     CT, window", "6 × 6 mm in-plane", "data:      not recorded", "scores:    none recorded",
                 f"weights:   sha256 {sha256_file(user_models_dir() / 'tiny-sdseg' / 'weights.safetensors')}\n",
                 "card:      none (the package is in", "meddiffseg models info tiny-sdseg --json"):
        assert text in out, text
    assert main(["models", "info", "tiny-sdseg", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads((user_models_dir() / "tiny-sdseg" / "model.json").read_text()) and record["method"] == "sdseg"


def test_cli_models_list_and_info_show_modality_and_defaults(builtin_dir, tiny_packages, tiny_mr, capsys):
    _as_named(tiny_packages["guided"], builtin_dir, "abdomen-ct-guided")
    _as_named(tiny_packages["sdseg"], builtin_dir, "abdomen-ct-dts")
    _as_named(tiny_mr, builtin_dir, "liver-mr")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert "CT (default)" in lines["abdomen-ct-guided"] and "(default)" not in lines["abdomen-ct-dts"]
    assert "MR (default)" in lines["liver-mr"] and "no " not in out
    assert main(["models", "list", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed["liver-mr"]["modality"] == "MR" and listed["liver-mr"]["default_for"] == "MR"
    assert listed["abdomen-ct-guided"]["default_for"] == "CT" and listed["abdomen-ct-dts"]["default_for"] is None
    assert main(["models", "info", "liver-mr"]) == 0
    assert "modality:  MR (the default MR model)\n" in capsys.readouterr().out
    assert main(["models", "info", "abdomen-ct-dts"]) == 0
    out = capsys.readouterr().out
    assert "modality:  CT\n" in out


def test_cli_models_info_of_the_shipped_default_is_short_and_local_paths_stay_in_the_json(capsys):
    """Issue #25: 'models info abdomen-ct' printed 19 kB, one line of 13,271 characters of raw JSON, and the
    path of the machine it was trained on (provenance.init_from). Now: short lines; --json the full record."""
    from MedDiffSegLib.registry import package_info
    from MedDiffSegLib.registry.card import score_lines

    pkg = package_info("abdomen-ct")
    assert main(["models", "info", "abdomen-ct"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(ln) for ln in lines) <= 100 and len(out) < 2000, out
    labels = [ln.split(":", 1)[0] for ln in lines[1:] if ln[:1].isalpha()]
    assert labels[:8] == ["about", "method", "modality", "organs", "input", "data", "scores", "weights"], labels
    assert lines[0] == f"abdomen-ct {pkg.version} (built-in)"
    assert "modality:  CT (the default CT model)" in out and "organs:    liver, spleen, kidney_right" in out
    trained = pkg.provenance["data"]["train"][0]
    assert f"data:      {trained['name']} ({len(trained['cases'])} cases)" in out
    first_scores = " ".join(score_lines(pkg.metrics)[0].split())
    liver = pkg.metrics["protocol"]["results"]["btcv"]["per_seed"]["0"]["organs"]["liver"]["dice_mean"]
    assert first_scores.startswith(f"mean Dice on 6 btcv test patients: liver {liver:.2f}, spleen ")
    assert first_scores in " ".join(out.split())  # wrapped, but all there
    assert f"card:      {pkg.path / 'MODEL_CARD.md'}" in out
    assert "init_from" not in out and "{" not in out and str(pkg.provenance["init_from"]["path"]) not in out
    assert main(["models", "info", "abdomen-ct", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads((pkg.path / "model.json").read_text()) and "init_from" in record["provenance"]


def test_cli_models_errors(builtin_dir, tiny_zips, tmp_path, capsys):
    assert main(["models", "info", "nope"]) == ModelError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("meddiffseg: error: model 'nope' is not installed") and err.count("\n") == 1

    assert main(["models", "install", str(tiny_zips["guided"]), "--sha256", "f" * 64]) == ModelError.exit_code
    assert "does not match the expected sha256" in capsys.readouterr().err
    assert main(["models", "install", str(tiny_zips["guided"])]) == 0
    capsys.readouterr()
    assert main(["models", "install", str(tiny_zips["guided"])]) == ModelError.exit_code
    assert "--force" in capsys.readouterr().err
    assert main(["models", "install", str(tiny_zips["guided"]), "--force"]) == 0


def test_cli_models_list_empty_and_broken(builtin_dir, capsys):
    assert main(["models"]) == 0
    assert "no models installed" in capsys.readouterr().out
    (user_models_dir() / "junk").mkdir(parents=True)
    assert main(["models", "list"]) == 0
    captured = capsys.readouterr()
    assert "warning: skipping model folder" in captured.err and "junk" in captured.err


# -- torch-free metadata, URL install, update, remove (issue 14) ------------------------------------------------


def _local_server_module():
    """Testing/slicer/localserver.py: the bounded 127.0.0.1 file server shared with the Slicer panel's tests."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "slicer" / "localserver.py"
    spec = importlib.util.spec_from_file_location("meddiffseg_test_localserver", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LocalFileServer = _local_server_module().LocalFileServer


def _with_version(src: Path, root: Path, version: str) -> Path:
    """A copy of package folder ``src`` whose model.json says ``version`` (same name, same weights)."""
    dst = root / f"{src.name}-{version}" / src.name
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    meta["version"] = version
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="session")
def versioned_zips(tiny_packages, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {v: export_zip(ModelPackage.from_folder(_with_version(tiny_packages["guided"], root, v)),
                          root / f"tiny-guided-{v}.zip") for v in ("0.0.2", "0.1.0")}


def test_package_info_matches_the_model_package(builtin_dir, tiny_packages):
    from MedDiffSegLib.registry import package_info, read_package_info

    shutil.copytree(tiny_packages["guided"], builtin_dir / "tiny-guided")
    full = ModelPackage.from_folder(builtin_dir / "tiny-guided")
    info = package_info("tiny-guided")
    assert info.path == full.path and (info.name, info.version, info.method_name) == (full.name, full.version, full.method_name)
    assert info.modality == full.modality and info.organ_names == full.organ_names
    assert [o.to_dict() for o in info.organs] == [o.to_dict() for o in full.organs]
    assert info.weights_sha256 == full.weights_sha256 and info.metrics == full.metrics
    assert info.organ_ids(["Spleen", "liver"]) == full.organ_ids(["Spleen", "liver"])
    with pytest.raises(ModelError, match="does not know organ"):
        info.organ_ids(["heart"])
    assert info.spacing == tuple(full.preprocessing.spacing)
    info.verify()
    assert info.load().name == full.name
    assert store.MODEL_JSON == "model.json" and store.WEIGHTS == "weights.safetensors"
    # Broken folders are reported the same way by both listings.
    (builtin_dir / "junk").mkdir()
    assert [b.path.name for b in store.scan_package_infos().broken] == [b.path.name for b in scan_packages().broken]
    bad = builtin_dir / "bad"
    shutil.copytree(tiny_packages["guided"], bad)
    meta = json.loads((bad / "model.json").read_text())
    meta["preprocessing"]["modality"] = "PET"
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="modality"):
        read_package_info(bad)


def test_registry_imports_and_lists_without_torch(builtin_dir, tiny_packages, tmp_path):
    """What the Slicer module does before PyTorch is installed: list, resolve and describe models."""
    import subprocess
    import sys

    shutil.copytree(tiny_packages["guided"], builtin_dir / "tiny-guided")
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'safetensors', 'monai', 'diffusers'):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
sys.meta_path.insert(0, NoTorch())
from MedDiffSegLib.registry import store, list_package_infos, package_info, default_package_info, models_for_modality
store.BUILTIN_MODELS_DIR = {str(builtin_dir)!r}
infos = list_package_infos()
assert [p.name for p in infos] == ['tiny-guided'], infos
assert package_info('tiny-guided').organ_names == ['liver', 'spleen']
assert default_package_info('CT').name == 'tiny-guided'
assert [p.name for p in models_for_modality('CT', infos)] == ['tiny-guided']
package_info('tiny-guided').verify()
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors')], 'torch was imported'
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, MEDDIFFSEG_HOME=str(tmp_path / "home")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_install_from_url_checks_sha256_and_reports_progress(builtin_dir, tiny_zips):
    from MedDiffSegLib.registry import install_package

    data = tiny_zips["guided"].read_bytes()
    digest = sha256_file(tiny_zips["guided"])
    with LocalFileServer({"/tiny.zip": data}, chunk_size=4096) as server:
        url = server.url("/tiny.zip")
        with pytest.raises(ModelError, match="needs the sha256"):
            install_package(url)
        with pytest.raises(ModelError, match="does not match the expected sha256"):
            install_package(url, sha256="0" * 64)
        assert _installed_entries() == []  # nothing left behind, not even the download
        events = []
        info = install_package(url, sha256=digest, progress=lambda *e: events.append(e), full_check=False)
        with pytest.raises(ModelError, match="cannot download"):
            install_package(server.url("/missing.zip"), sha256=digest)
    assert info.name == "tiny-guided" and package_origin(info) == "user"
    assert _installed_entries() == ["tiny-guided"]
    downloads = [f for stage, f, _ in events if stage == "download"]
    assert downloads[0] == 0.0 and downloads[-1] == 1.0 and downloads == sorted(downloads) and len(downloads) > 3
    assert [s for s, *_ in events][-1] == "install"
    assert server.requests.count("/tiny.zip") == 2  # without a sha256 nothing is even requested


def test_url_download_is_bounded_and_cancellable(builtin_dir, tiny_zips, tmp_path):
    from MedDiffSegLib.errors import Cancelled
    from MedDiffSegLib.registry import download, install_package

    data = tiny_zips["guided"].read_bytes()
    digest = sha256_file(tiny_zips["guided"])
    with LocalFileServer({"/tiny.zip": data}, chunk_size=1024, chunk_delay=0.01) as server:
        url = server.url("/tiny.zip")
        with pytest.raises(ModelError, match="bytes, more than the 1000 allowed"):
            download(url, tmp_path / "a.zip", digest, max_bytes=1000)
        assert not (tmp_path / "a.zip").exists()
        seen = []
        with pytest.raises(Cancelled):
            install_package(url, sha256=digest, progress=lambda *e: seen.append(e),
                            should_cancel=lambda: len(seen) > 3)
    assert _installed_entries() == []
    with LocalFileServer({"/tiny.zip": data}, send_length=False) as server:  # size unknown: fraction -1
        with pytest.raises(ModelError, match="sends more than the 1000 bytes"):
            download(server.url("/tiny.zip"), tmp_path / "c.zip", digest, max_bytes=1000)
        assert not (tmp_path / "c.zip").exists()
        events = []
        download(server.url("/tiny.zip"), tmp_path / "b.zip", digest, progress=lambda *e: events.append(e))
    assert events[0][1] == -1.0 and events[-1][1] == 1.0
    assert sha256_file(tmp_path / "b.zip") == digest


def test_update_needs_the_same_model_in_a_newer_version(builtin_dir, tiny_packages, tiny_zips, versioned_zips):
    from MedDiffSegLib.registry import update_package

    shutil.copytree(tiny_packages["guided"], builtin_dir / "tiny-guided")  # built-in 0.0.1
    with pytest.raises(ModelError, match="not newer"):
        update_package("tiny-guided", tiny_zips["guided"])
    with pytest.raises(ModelError, match="holds model 'tiny-sdseg', not 'tiny-guided'"):
        update_package("tiny-guided", tiny_zips["sdseg"], allow_downgrade=True)
    with pytest.raises(ModelError, match="not installed"):
        update_package("tiny-nothing", versioned_zips["0.0.2"])
    before, after = update_package("tiny-guided", versioned_zips["0.1.0"])
    assert (before.version, after.version) == ("0.0.1", "0.1.0")
    assert package_origin(resolve_model("tiny-guided")) == "user"  # shadows the built-in, which is unchanged
    assert ModelPackage.from_folder(builtin_dir / "tiny-guided").version == "0.0.1"
    with pytest.raises(ModelError, match="not newer"):
        update_package("tiny-guided", versioned_zips["0.0.2"])
    _, after = update_package("tiny-guided", versioned_zips["0.0.2"], allow_downgrade=True)
    assert after.version == "0.0.2" and _installed_entries() == ["tiny-guided"]
    assert store.is_newer("0.10.0", "0.9.1") and not store.is_newer("1.0", "1.0.0") and store.is_newer("2", "1.x")


def test_remove_deletes_user_packages_only(builtin_dir, tiny_packages, tiny_zips):
    from MedDiffSegLib.registry import remove_package

    shutil.copytree(tiny_packages["guided"], builtin_dir / "tiny-guided")
    with pytest.raises(ModelError, match="built in"):
        remove_package("tiny-guided")
    with pytest.raises(ModelError, match="not installed"):
        remove_package("tiny-sdseg")
    with pytest.raises(ModelError, match="not a model name"):
        remove_package("../x")
    install_zip(tiny_zips["guided"])  # a user copy shadows the built-in
    assert package_origin(resolve_model("tiny-guided")) == "user"
    assert remove_package("tiny-guided") == user_models_dir() / "tiny-guided"
    assert package_origin(resolve_model("tiny-guided")) == "built-in" and _installed_entries() == []


def test_cli_models_install_url_update_remove_verify(builtin_dir, tiny_zips, versioned_zips, capsys):
    digest = sha256_file(tiny_zips["guided"])
    with LocalFileServer({"/tiny.zip": tiny_zips["guided"].read_bytes(),
                          "/new.zip": versioned_zips["0.1.0"].read_bytes()}) as server:
        assert main(["models", "install", server.url("/tiny.zip")]) == ModelError.exit_code
        assert "needs the sha256" in capsys.readouterr().err
        assert main(["models", "install", server.url("/tiny.zip"), "--sha256", digest]) == 0
        assert "installed tiny-guided 0.0.1" in capsys.readouterr().out
        new_digest = sha256_file(versioned_zips["0.1.0"])
        assert main(["models", "update", "tiny-guided", server.url("/new.zip"), "--sha256", new_digest]) == 0
        assert "updated tiny-guided from 0.0.1 to 0.1.0" in capsys.readouterr().out
    assert main(["models", "info", "tiny-guided", "--verify"]) == 0
    assert "(verified)" in capsys.readouterr().out
    weights = user_models_dir() / "tiny-guided" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert main(["models", "info", "tiny-guided", "--verify"]) == ModelError.exit_code
    assert "does not match its sha256" in capsys.readouterr().err
    assert main(["models", "remove", "tiny-guided"]) == 0
    assert "removed tiny-guided" in capsys.readouterr().out
    assert main(["models", "remove", "tiny-guided"]) == ModelError.exit_code
    assert main(["models", "--help"]) == 0
    out = capsys.readouterr().out
    for word in ("update", "remove", "--sha256", "http"):
        assert word in out


def test_data_text_names_datasets_and_case_counts_never_paths():
    from MedDiffSegLib.registry.card import data_text

    assert data_text(None) == data_text({}) == data_text({"trained": False}) == ""
    assert data_text({"data": "12 BTCV patients"}) == "12 BTCV patients"
    assert data_text({"data": {"train": [{"dataset": "btcv/dataset.json", "name": "btcv", "cases": ["a", "b"]}],
                               "validation": [{"name": "dcmqi", "image": "/some/where/ct"}]}}) == \
        "btcv (2 cases); validation: dcmqi"
    assert data_text({"dataset": ["x", {"dataset": "y.json"}]}) == "x, y.json"
