"""Hydra's composition errors and unimportable targets in rcd's one form: ``[rcd] error: <key>: ...``, exit 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rcd.errors import EXIT_CODE
from rcd.preflight import check_argv, first_values, split_argv

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ROOT / "tests" / "fixtures" / "outside"


def refused(argv, capsys, config_name="config") -> str:
    with pytest.raises(SystemExit) as e:
        check_argv(argv, config_name)
    assert e.value.code == EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert err.startswith("[rcd] error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("argv, want", [
    (["+strategy=per_token", "strategy.control.kk=3"],
     "[rcd] error: strategy.control.kk: no such key: strategy.control has no 'kk'; did you mean k? choices: k, "),
    (["+strategy=per_tokn"], "[rcd] error: strategy: no option 'per_tokn'; did you mean per_token"),
    (["+strategy=per_token", "strategy/schedule=evry_n"], "[rcd] error: strategy/schedule: no option 'evry_n'; did "
                                                          "you mean every_n"),
    (["+strategy=per_token", "+strategy.control.k=3"], "[rcd] error: strategy.control.k: already exists: set it "
                                                       "without '+' (strategy.control.k=<value>)"),
    (["--multirun", "+strategy=per_token", "strategy.control.k=16,64", "tsk.n=3"],
     "[rcd] error: tsk.n: no such key: the top level has no 'tsk'; did you mean task?"),
    (["+strategy=per_token", "~strategy.control.kx"], "[rcd] error: strategy.control.kx: cannot be deleted: "
                                                      "strategy.control has no 'kx'; did you mean k?"),
    (["+strategy=per_token", "strategy.control.k=[1,"], "[rcd] error: strategy.control.k=[1,: not a valid override"),
])
def test_composition_errors_name_the_key_and_the_fix(argv, want, capsys):
    assert refused(argv, capsys).startswith(want)


def test_a_command_line_that_composes_goes_on(capsys):
    check_argv(["--multirun", "hydra/launcher=rcd_processes", "hydra.launcher.n_jobs=2", "+strategy=per_token",
                "strategy.control.k=16,64,256", "task.eval_tokens=range(64,128,32)"])
    check_argv(["--config-dir", str(OUTSIDE / "conf"), "+strategy=boost"])
    check_argv(["datastore=chunks", "corpus=wordnet"], config_name="build")
    assert capsys.readouterr().err == ""
    refused(["datastore=chunkz"], capsys, config_name="build")


def test_sweeps_are_checked_at_their_first_value_and_flags_are_kept_apart():
    over, flags, cd = split_argv(["-m", "--config-dir", "my_conf", "+strategy=x", "a.b=1,2", "--cfg", "job"])
    assert over == ["+strategy=x", "a.b=1,2"] and cd == "my_conf" and flags == ["-m", "--config-dir", "my_conf",
                                                                             "--cfg", "job"]
    assert first_values(["a.b=1,2", "hydra.launcher.n_jobs=2", "c=range(3,5)"]) == ["a.b=1", "c=3"]


def _cli(args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "rcd.run"] + args, capture_output=True, text=True, timeout=300,
                          cwd=cwd or ROOT, env=dict(os.environ, **(env or {})))


def test_cli_missing_target_module_and_typo_exit_2_with_one_line(tmp_path):
    p = _cli(["--config-dir", str(OUTSIDE / "conf"), "+strategy=boost"], cwd=tmp_path)
    assert p.returncode == EXIT_CODE and p.stdout == ""
    assert p.stderr.strip() == ("[rcd] error: strategy.control._target_: cannot import 'chunk_boost.ChunkBoost': no "
                                "module 'chunk_boost' on the path (ModuleNotFoundError). Put the folder holding "
                                "chunk_boost.py (or the package chunk_boost/) on PYTHONPATH, e.g. "
                                "PYTHONPATH=<folder> rcd-run ..., or correct the name")
    p = _cli(["--config-dir", str(OUTSIDE / "conf"), "+strategy=boost", "strategy.control._target_=chunk_boost.Nope"],
             env={"PYTHONPATH": os.pathsep.join([str(OUTSIDE), str(ROOT)])}, cwd=tmp_path)
    assert p.returncode == EXIT_CODE
    assert p.stderr.strip().startswith("[rcd] error: strategy.control._target_: cannot load 'chunk_boost.Nope': "
                                       "module 'chunk_boost' was found, but 'Nope' could not be loaded")
    p = _cli(["+strategy=per_token", "strategy.control.lambda=0.3"], cwd=tmp_path)
    assert p.returncode == EXIT_CODE and "did you mean lmbda?" in p.stderr and "Traceback" not in p.stderr


def test_multirun_override_of_a_key_only_a_swept_preset_brings_names_the_fix(capsys):
    """Hydra's multirun composes the command line without its sweeps first: datastore.retriever does not exist
    before +strategy=once,cad is chosen. Refused in rcd's form with the fix (Hydra printed 'Could not override',
    exit 1); with the group chosen on the command line the same sweep composes."""
    argv = ["--multirun", "task=qa_mendeleev", "datastore.retriever=bm25", "+strategy=once,cad"]
    err = refused(argv, capsys)
    assert err.startswith("[rcd] error: datastore.retriever: a --multirun first composes the command line without "
                          "its sweeps (+strategy=once,cad)") and "datastore=chunks" in err
    check_argv(["--multirun", "task=qa_mendeleev", "datastore=chunks", "datastore.retriever=bm25",
                "+strategy=once,cad"])  # composes: no exit
    check_argv(["task=qa_mendeleev", "datastore.retriever=bm25", "+strategy=once"])  # a single run is fine
