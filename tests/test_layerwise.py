"""The problem checks that GPTQ, SpQR, QuIP and QuIP# share (layerwise.check_problem): each method's
`quantize` answers a weight and Hessian that do not fit together with the same one-line UserError."""
import numpy as np
import pytest

import gptq
import quip
import quipsharp
import spqr
from runtime.errors import UserError

BAD_PROBLEMS = [
    (np.ones((4, 64), np.float32), np.eye(32), "Hessian must be"),
    (np.ones(64, np.float32), np.eye(64), "2-D"),
    (np.full((4, 64), np.nan, np.float32), np.eye(64), "NaN or infinity"),
    (np.ones((4, 64), np.float32), np.full((64, 64), np.inf), "NaN or infinity"),
]


@pytest.mark.parametrize("method", [gptq, spqr, quip, quipsharp], ids=lambda m: m.__name__)
@pytest.mark.parametrize("W, H, message", BAD_PROBLEMS, ids=["hessian-shape", "1-d-weight", "nan-weight",
                                                             "inf-hessian"])
def test_bad_problems_are_one_user_error(method, W, H, message):
    with pytest.raises(UserError, match=message):
        method.quantize(W, H)
