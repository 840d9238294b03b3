"""The package's import surface."""


def test_importing_target_specs_loads_neither_torch_nor_timm():
    """The feature store and the training worker import ``tokconv.targets`` before anything
    heavy (the worker's start-up); the package's own names still load on first use."""
    import subprocess
    import sys
    code = ("import sys, tokconv.targets; heavy = {'torch', 'timm'} & set(sys.modules); "
            "assert not heavy, heavy; import tokconv; "
            "assert tokconv.create_converter('baseline_interp_linear').config['name'] "
            "== 'baseline_interp_linear'; assert 'timm' in sys.modules; "
            "assert 'save_head' in dir(tokconv)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
