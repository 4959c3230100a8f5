"""The model catalogue: installing by name from a (local) server, its base URL, the shipped catalogue, reproducible zips.

Every download goes to a bounded HTTP server on 127.0.0.1 that the test starts and stops
(Testing/slicer/localserver.py); "no network" is a port on 127.0.0.1 that nothing listens on.
"""

from __future__ import annotations

import json
import os
import socket
import zipfile
from pathlib import Path

import pytest

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.errors import ModelError
from MedDiffSegLib.registry import catalogue as cat
from MedDiffSegLib.registry import export_zip, read_package_info, sha256_file, store, user_models_dir
from tinymodels import make_tiny_package

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "MedDiffSegLib" / "models"


def _local_server_class():
    import importlib.util

    spec = importlib.util.spec_from_file_location("meddiffseg_test_localserver",
                                                  REPO / "Testing" / "slicer" / "localserver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LocalFileServer


LocalFileServer = _local_server_class()


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalogue_pkg")
    pkg = make_tiny_package(root / "tiny-guided", "guided")
    return export_zip(read_package_info(pkg.path), root / "tiny-guided-0.0.1.zip")


@pytest.fixture
def catalogue_file(tmp_path, monkeypatch, tiny_zip) -> Path:
    """A catalogue listing the tiny package (placeholder base URL), in place of the shipped one; no built-ins."""
    entry = cat.catalogue_entry_for(tiny_zip.parent / "tiny-guided")
    assert entry["sha256"] == sha256_file(tiny_zip) and entry["size"] == tiny_zip.stat().st_size
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps({"format": 1, "base_url": "https://models.meddiffseg.example/packages/",
                                "packages": [entry]}))
    monkeypatch.setattr(cat, "CATALOGUE_FILE", path)
    builtin = tmp_path / "builtin"
    builtin.mkdir()
    monkeypatch.setattr(store, "BUILTIN_MODELS_DIR", builtin)
    monkeypatch.delenv(cat.CATALOGUE_URL_ENV, raising=False)
    return path


def _left_in_user_folder() -> list[str]:
    d = user_models_dir()
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- installing by name ---------------------------------------------------------------------------------------


def test_install_by_name_from_a_local_server_with_progress_and_checks(catalogue_file, tiny_zip, monkeypatch):
    data = tiny_zip.read_bytes()
    with LocalFileServer({"/mirror/tiny-guided-0.0.1.zip": data}, chunk_size=2048) as server:
        monkeypatch.setenv(cat.CATALOGUE_URL_ENV, server.url("/mirror"))  # no trailing slash: added
        events = []
        info = cat.install_from_catalogue("tiny-guided", progress=lambda *e: events.append(e), full_check=False)
    assert server.requests == ["/mirror/tiny-guided-0.0.1.zip"]
    assert (info.name, info.version) == ("tiny-guided", "0.0.1") and _left_in_user_folder() == ["tiny-guided"]
    info.verify()
    downloads = [f for stage, f, _ in events if stage == "download"]
    assert downloads[0] == 0.0 and downloads[-1] == 1.0 and downloads == sorted(downloads) and len(downloads) > 3
    assert [s for s, *_ in events][-1] == "install"
    with pytest.raises(ModelError, match="already installed"):  # a second install needs force
        cat.install_from_catalogue("tiny-guided", base_url="http://127.0.0.1:1/", full_check=False)


@pytest.mark.parametrize("case", ["wrong hash", "wrong size", "cut off", "short, no length", "chunked, cut off",
                                  "wrong version"])
def test_a_bad_download_is_refused_clearly_and_leaves_nothing(catalogue_file, tiny_zip, case):
    data = tiny_zip.read_bytes()
    entry = json.loads(catalogue_file.read_text())["packages"][0]
    server_kw: dict = {}
    if case == "wrong hash":
        entry["sha256"] = "0" * 64
        expected = "does not match the expected sha256"
    elif case == "wrong size":  # the server sends a complete file of another length than the catalogue's
        data = data[:-100]
        expected = f"is {len(data)} bytes, not the {entry['size']} expected"
    elif case == "cut off":  # announced in full, broken off after a third
        server_kw = {"cut_after": len(data) // 3}
        expected = rf"stopped after {len(data) // 3} of {len(data)} bytes \(truncated\)"
    elif case == "short, no length":
        data, server_kw = data[:5000], {"send_length": False}
        expected = rf"stopped after 5000 of {entry['size']} bytes \(truncated\)"
    elif case == "chunked, cut off":  # no length; the stream breaks off inside the chunks
        server_kw = {"chunked": True, "cut_after": 3072}
        expected = rf"stopped after 3072 of {entry['size']} bytes \(truncated\)"
    else:
        entry["version"] = "9.9.9"
        expected = "holds tiny-guided 0.0.1, not version 9.9.9; not installed"
    catalogue_file.write_text(json.dumps({"format": 1, "base_url": "https://x.example/", "packages": [entry]}))
    with LocalFileServer({"/tiny-guided-0.0.1.zip": data}, chunk_size=1024, **server_kw) as server:
        with pytest.raises(ModelError, match=expected):
            cat.install_from_catalogue("tiny-guided", base_url=server.url("/"), full_check=False)
        rc = main(["models", "install", "tiny-guided", "--catalogue-url", server.url("/")])
    assert rc == ModelError.exit_code
    assert _left_in_user_folder() == []  # no package, no download, no staging folder


def test_no_network_says_where_the_base_url_comes_from_and_leaves_nothing(catalogue_file, monkeypatch, capsys):
    port = _free_port()
    monkeypatch.setenv(cat.CATALOGUE_URL_ENV, f"http://127.0.0.1:{port}/packages/")
    with pytest.raises(ModelError, match=rf"cannot download http://127.0.0.1:{port}/packages/tiny-guided-0.0.1.zip: "
                                         rf".*refused.*from \$MEDDIFFSEG_CATALOGUE_URL"):
        cat.install_from_catalogue("tiny-guided", full_check=False)
    assert main(["models", "install", "tiny-guided"]) == ModelError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("meddiffseg: error: cannot download") and "refused" in err and len(err.splitlines()) == 1
    assert _left_in_user_folder() == []


def test_the_placeholder_base_url_is_said_without_trying_the_network(catalogue_file, capsys):
    assert cat.is_placeholder("https://models.meddiffseg.example/packages/x.zip")
    assert not cat.is_placeholder("http://127.0.0.1:8000/x.zip") and not cat.is_placeholder("https://example.org/x")
    assert main(["models", "install", "tiny-guided"]) == ModelError.exit_code
    err = capsys.readouterr().err
    assert "no download server yet" in err and "placeholder" in err and cat.CATALOGUE_URL_ENV in err


def test_the_cli_installs_by_name_and_refuses_what_does_not_fit(catalogue_file, tiny_zip, monkeypatch, capsys):
    assert main(["models", "install", "no-such-model"]) == ModelError.exit_code
    assert "nor a package of the model catalogue (it lists: tiny-guided" in capsys.readouterr().err
    assert main(["models", "install", "tiny-guided", "--sha256", "0" * 64]) == ModelError.exit_code
    assert "checked against the catalogue's sha256" in capsys.readouterr().err
    assert main(["models", "install", str(tiny_zip), "--catalogue-url", "http://127.0.0.1:1/"]) == ModelError.exit_code
    assert "--catalogue-url is for a catalogue package" in capsys.readouterr().err
    with LocalFileServer({"/m/tiny-guided-0.0.1.zip": tiny_zip.read_bytes()}) as server:
        assert main(["models", "install", "tiny-guided", "--catalogue-url", server.url("/m/")]) == 0
    assert "installed tiny-guided 0.0.1 (guided" in capsys.readouterr().out
    assert _left_in_user_folder() == ["tiny-guided"]
    assert main(["models", "catalogue"]) == 0
    out = capsys.readouterr().out
    assert "tiny-guided" in out and "0.0.1" in out and "base URL: https://models.meddiffseg.example/packages/" in out
    assert "a placeholder" in out


# -- the base URL ----------------------------------------------------------------------------------------------


def test_base_url_argument_then_environment_then_setting_then_catalogue(catalogue_file, monkeypatch, capsys):
    base, source = cat.catalogue_base_url()
    assert base == "https://models.meddiffseg.example/packages/" and source == "base_url in catalogue.json"
    assert main(["models", "catalogue", "--set-url", "http://mirror.hospital.local/meddiffseg"]) == 0
    settings = json.loads(cat.settings_path().read_text())
    assert settings == {"catalogue_url": "http://mirror.hospital.local/meddiffseg/"}
    assert cat.catalogue_base_url() == ("http://mirror.hospital.local/meddiffseg/", f"the setting in {cat.settings_path()}")
    monkeypatch.setenv(cat.CATALOGUE_URL_ENV, "https://env.example.org/zips/")
    assert cat.catalogue_base_url()[0] == "https://env.example.org/zips/"
    assert cat.catalogue_base_url("http://10.0.0.5/m/")[0] == "http://10.0.0.5/m/"
    entry = cat.load_catalogue().entry("tiny-guided")
    assert entry.download_url("http://10.0.0.5/m/") == "http://10.0.0.5/m/tiny-guided-0.0.1.zip"
    capsys.readouterr()
    assert main(["models", "catalogue", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["base_url_from"] == f"${cat.CATALOGUE_URL_ENV}"
    assert listed["packages"][0]["download_url"] == "https://env.example.org/zips/tiny-guided-0.0.1.zip"
    assert listed["packages"][0]["installed_version"] is None
    monkeypatch.delenv(cat.CATALOGUE_URL_ENV)
    assert main(["models", "catalogue", "--unset-url"]) == 0
    assert json.loads(cat.settings_path().read_text()) == {}
    assert cat.catalogue_base_url()[1] == "base_url in catalogue.json"
    for bad in ("ftp://mirror/zips/", "mirror.local/zips", ""):
        with pytest.raises(ModelError, match="must be an http:// or https:// URL"):
            cat.set_catalogue_url(bad)
    monkeypatch.setenv(cat.CATALOGUE_URL_ENV, "file:///srv/zips")
    assert main(["models", "install", "tiny-guided"]) == ModelError.exit_code
    assert "MEDDIFFSEG_CATALOGUE_URL) must be an http:// or https:// URL" in capsys.readouterr().err
    monkeypatch.delenv(cat.CATALOGUE_URL_ENV)
    cat.settings_path().write_text("{not json")  # a settings file edited by hand and broken: said, not ignored
    assert main(["models", "catalogue"]) == ModelError.exit_code
    assert f"cannot read the settings {cat.settings_path()}" in capsys.readouterr().err
    assert _left_in_user_folder() == []


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format=2), "not a model catalogue of format 1"),
    (lambda d: d["packages"][0].pop("sha256"), "lacks sha256"),
    (lambda d: d["packages"][0].update(size=0), "size a positive byte count"),
    (lambda d: d["packages"].append(dict(d["packages"][0])), "listed twice"),
    (lambda d: d["packages"][0].update(url="ftp://x/y.zip"), "url must be"),
    (lambda d: d["packages"][0].update(organs=[]), "organs must be"),
])
def test_a_malformed_catalogue_is_refused_naming_the_problem(catalogue_file, change, message):
    data = json.loads(catalogue_file.read_text())
    change(data)
    catalogue_file.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message):
        cat.load_catalogue()


# -- the shipped catalogue and reproducible zips ----------------------------------------------------------------


def test_the_shipped_catalogue_lists_every_package_but_the_defaults_with_the_zips_real_hash_and_size():
    from MedDiffSegLib.modality import DEFAULT_MODELS

    catalogue = cat.load_catalogue(REPO / "MedDiffSegLib" / "registry" / "catalogue.json")
    assert cat.is_placeholder(catalogue.base_url)
    in_tree = sorted(p.name for p in MODELS.iterdir() if (p / "model.json").is_file())
    assert sorted(catalogue.names()) == sorted(set(in_tree) - set(DEFAULT_MODELS.values()))
    for entry in catalogue.entries:
        fresh = cat.catalogue_entry_for(MODELS / entry.name)  # the zip export_zip writes now, hashed
        assert entry.to_dict() == fresh, entry.name
        assert entry.url == f"{entry.name}-{entry.version}.zip"


def test_the_catalogue_is_package_data_of_the_python_package():
    """A wheel holds the catalogue: 'models install NAME' works from a pip install too."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["MedDiffSegLib"]
    assert any(fnmatch.fnmatch("registry/catalogue.json", p) for p in patterns)
    assert cat.CATALOGUE_FILE == REPO / "MedDiffSegLib" / "registry" / "catalogue.json"


def test_export_zip_is_reproducible(tmp_path):
    src = tmp_path / "a" / "pkg"
    make_tiny_package(src, "guided", name="pkg")
    first = export_zip(read_package_info(src), tmp_path / "first.zip")
    os.utime(src / "model.json", (1_000_000_000, 1_000_000_000))  # other times and modes, another copy
    os.chmod(src / "weights.safetensors", 0o600)
    other = tmp_path / "b" / "pkg"
    other.parent.mkdir()
    os.rename(src, other)
    second = export_zip(read_package_info(other), tmp_path / "second.zip")
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(second) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["pkg/model.json", "pkg/weights.safetensors"]
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) and i.compress_type == zipfile.ZIP_STORED
                   and (i.external_attr >> 16) == 0o100644 for i in infos)
        assert zf.testzip() is None
