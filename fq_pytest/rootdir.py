"""The rootdir and configuration file pytest would have chosen had it known the fq options.

pytest picks the rootdir and reads its configuration file before it loads any plugin, so the
value of `--fq-model /path/model.gguf` (the space form) is first taken for a test path: the
rootdir becomes the model's folder, the project's pytest.ini is never read and results/ lands
beside the model. Once the plugin's options are known (before the conftests load), the setup is
decided again from the real test paths and adopted when it differs. This leans on pytest's
private Config fields (pytest 9); where they are not as expected, pytest's own choice stands.
"""

from __future__ import annotations

import copy

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, args: list[str], parser) -> None:
    ns = early_config.known_args_namespace
    if not getattr(ns, "fq_model", None) or early_config.inipath is not None:
        return  # nothing of ours to mistake for a test path, or a config file already applied
    try:
        from _pytest.config.findpaths import determine_setup

        rootpath, inipath, inicfg, ignored = determine_setup(
            inifile=ns.inifilename,
            override_ini=ns.override_ini,
            args=ns.file_or_dir,
            rootdir_cmd_arg=ns.rootdir or None,
            invocation_dir=early_config.invocation_params.dir,
        )
        if (rootpath, inipath) == (early_config.rootpath, early_config.inipath):
            return
        early_config._rootpath, early_config._inipath = rootpath, inipath
        early_config._inicfg, early_config._ignored_config_files = inicfg, ignored
        early_config._inicache.clear()
    except (ImportError, AttributeError, TypeError, ValueError):
        return
    parser.extra_info.update(rootdir=str(rootpath), inifile=str(inipath))
    addopts = list(early_config.getini("addopts"))
    if addopts:
        args[:] = [*addopts, *args]
        early_config.pluginmanager.consider_preparse(addopts, exclude_only=False)
        ns = early_config.known_args_namespace = parser.parse_known_args(
            args, namespace=copy.copy(early_config.option)
        )
    early_config._configure_python_path()
    ns.confcutdir = str(inipath.parent if inipath is not None else rootpath)
