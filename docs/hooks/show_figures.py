"""IPython startup file for the docs build (copied into a temporary IPYTHONDIR by ``docs/hooks/tutorials.py``).

The tutorials select matplotlib's non-interactive Agg backend so that ``python tutorials/NN_x.py`` runs headless
and saves its figures, which also keeps Jupyter's inline backend from showing them when mkdocs-jupyter executes
the tutorial. This restores the inline behaviour for the docs build only: after every cell, each figure still
open is rendered to PNG, displayed as that cell's output, and closed. Not a page (``docs/hooks/`` is excluded).
"""


def _minimtp_docs_show_figures():
    import io
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None or not plt.get_fignums():
        return
    from IPython.display import Image, display

    for num in plt.get_fignums():
        buf = io.BytesIO()
        plt.figure(num).savefig(buf, format="png", dpi=80, bbox_inches="tight")
        display(Image(data=buf.getvalue(), format="png"))
    plt.close("all")


get_ipython().events.register("post_execute", _minimtp_docs_show_figures)  # noqa: F821 (IPython startup global)
del _minimtp_docs_show_figures
