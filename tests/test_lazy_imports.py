"""`import ntkfast` is light (no torch), and every public subpackage and name is an attribute of
the package, loaded on first use. Each check runs in a fresh interpreter: this one has torch and
most of ntkfast loaded already."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUBPACKAGES = ("methods", "masks", "ops", "scores", "ntt", "ntk", "pathkernel", "connectivity", "models", "data",
               "training", "study", "report", "distributed", "plots", "core", "structured")


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_import_ntkfast_loads_neither_torch_nor_the_extension():
    assert _run("import sys, ntkfast; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')"
                " or m == 'ntkfast._C'))") == "[]"


def test_every_public_subpackage_is_an_attribute_loaded_on_first_use():
    code = ("import sys, types, ntkfast\n"
            f"names = {SUBPACKAGES!r}\n"
            "assert not any(f'ntkfast.{n}' in sys.modules for n in ('pathkernel', 'study', 'report', 'connectivity'))\n"
            "assert all(n in dir(ntkfast) for n in names)\n"
            "mods = [getattr(ntkfast, n) for n in names]\n"
            "assert all(isinstance(m, types.ModuleType) and m.__name__ == f'ntkfast.{n}' for m, n in zip(mods, names))\n"
            "print(callable(ntkfast.pathkernel.trace), callable(ntkfast.connectivity.connectivity),"
            " callable(ntkfast.study.run_study), callable(ntkfast.report.write_report))\n")
    assert _run(code) == "True True True True"


def test_the_pathkernel_trace_of_the_issue_runs_from_import_ntkfast_alone():
    code = ("import ntkfast\n"
            "import torch\n"
            "model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.ReLU(), torch.nn.Linear(3, 2, bias=False))\n"
            "print(float(ntkfast.pathkernel.trace(model, input_shape=(4,))) > 0)\n")
    assert _run(code) == "True"


def test_the_top_level_names_are_the_functions_and_classes_whichever_import_comes_first():
    code = ("import types\n"
            "import ntkfast.prune  # the module of the same name, first\n"
            "import ntkfast\n"
            "from ntkfast import Masks, TransferResult, build_info, prunable_parameters, train, transfer\n"
            "from ntkfast.prune import prune as the_function\n"
            "assert ntkfast.prune is the_function and not isinstance(ntkfast.prune, types.ModuleType)\n"
            "assert ntkfast.train is ntkfast.training.train and ntkfast.Masks is ntkfast.masks.Masks\n"
            "assert ntkfast.transfer is ntkfast.ntt.transfer\n"
            "try:\n"
            "    ntkfast.no_such_thing\n"
            "except AttributeError as e:\n"
            "    print(e)\n")
    assert _run(code) == "module 'ntkfast' has no attribute 'no_such_thing'"


def test_star_import_gives_the_public_names():
    assert _run("from ntkfast import *\nprint(callable(prune), callable(train), Masks.__name__, "
                "pathkernel.__name__)") == "True True Masks ntkfast.pathkernel"


def test_the_method_registry_holds_the_built_ins_however_it_is_reached():
    code = ("from ntkfast import methods\n"
            "print(len(methods.available()), methods.get('ntt').name)\n")
    assert _run(code) == "12 ntt"


def test_a_built_in_name_is_taken_before_the_built_ins_load():
    code = ("from ntkfast import methods\n"
            "try:\n"
            "    methods.register('snip', 'mine')(lambda model, masks=None, *, data=None, seed=0: {})\n"
            "except ValueError as e:\n"
            "    print(e)\n"
            "print(methods.get('snip').description.startswith('SNIP'))\n")
    assert _run(code) == "a method named 'snip' is already registered\nTrue"
