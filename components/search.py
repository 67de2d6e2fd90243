"""`ace search`: the champion's top-K for one query, with titles and an optional image sheet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.config import Params
from components.errors import AceError


def search_titles(
    params: Params, model_uri: str, query: str, k: int
) -> tuple[pd.DataFrame, str | None]:
    """(rows of product_id, score, title, image_path, cached, best first; the model's warning:
    for a query of only unknown words there are no rows, and the warning says why)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components import tracking

    tracking.use_experiment(params.tracking.experiment)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise AceError(f"{model_uri}: no such model ({err.message}); run the pipeline") from err
    try:
        found = model.predict(pd.DataFrame({"query": [query], "k": [k]}))
    except MlflowException as err:
        raise AceError(err.message) from err
    products = pd.read_parquet(params.paths.artifacts_dir / "validate" / "products.parquet")
    products = products.set_index("product_id")
    ids, scores = found["product_ids"][0], found["scores"][0]
    results = pd.DataFrame(
        {
            "product_id": ids,
            "score": scores,
            "title": [products.at[i, "title"] if i in products.index else "?" for i in ids],
            "image_path": [
                products.at[i, "image_path"] if i in products.index else None for i in ids
            ],
            "cached": bool(found["cached"][0]),
        }
    )
    return results, found["warning"][0]


def contact_sheet(params: Params, results: pd.DataFrame, query: str, path: Path) -> None:
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(results))
    cols = min(5, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), results.itertuples(), strict=False):
        image = cv2.imread(str(params.paths.data_dir / str(row.image_path)))
        if image is not None:
            ax.imshow(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        ax.set_title(f"{row.score:.2f} {str(row.title)[:28]}", fontsize=6)
    fig.suptitle(f"ace search: {query!r}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
