"""The served model's code, logged as MLflow "models from code" by serving.log_retriever.

MLflow runs this file (with the bundled `components` on the path) to build the pyfunc, so the
registered bundle holds code and files only: no pickled Python object to unpickle when serving.
"""

import mlflow

from components.serving.serving import AceRetrieverModel

mlflow.models.set_model(AceRetrieverModel())
