"""The page of ``ddpmkit serve``: a trained run to look at and play with in the browser (extra ``ddpmkit[ui]``)."""
