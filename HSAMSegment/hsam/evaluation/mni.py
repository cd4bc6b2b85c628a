"""The MNI152 ICBM 2009a nonlinear symmetric T1 template and its grey/white-matter labels, from the
copy inside the ``nilearn`` wheel: the data of the demo, the benchmarks and the synthetic subjects."""

from pathlib import Path

import numpy as np

from ..runtime.errors import InputError

TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
CITATION = (
    "MNI152 ICBM 2009a nonlinear symmetric template: Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, "
    "Collins DL, Brain Development Cooperative Group. Unbiased average age-appropriate atlases for "
    "pediatric studies. NeuroImage 54(1), 2011. Copyright McConnell Brain Imaging Centre, "
    "Montreal Neurological Institute; redistributed in the nilearn package."
)


def template_path(kind: str) -> Path:
    """The nilearn copy of the MNI152 2009a ``t1``, ``gm`` or ``wm`` image."""
    try:
        from importlib.resources import files
    except ImportError:  # pragma: no cover - Python < 3.9
        raise InputError("the demo needs Python 3.9 or later") from None
    try:
        data = files("nilearn.datasets") / "data"
    except ModuleNotFoundError:
        raise InputError("the demo needs the nilearn package (pip install nilearn), which ships the MNI152 template") from None
    path = Path(str(data / TEMPLATE.format(kind)))
    if not path.is_file():
        raise InputError(f"this nilearn version lacks {path.name}; install nilearn 0.10 or later")
    return path


def brain_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """uint8 labelmap from uint8 probability maps (value/255): 1 grey matter, 2 white matter."""
    gm, wm = gm.astype(np.float32) / 255.0, wm.astype(np.float32) / 255.0
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[(gm > 0.5) & (gm >= wm)] = 1
    labels[(wm > 0.5) & (wm > gm)] = 2
    return labels
