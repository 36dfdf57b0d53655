"""The code file of the registered MLflow model (models-from-code): MLflow runs it when the model loads, and
it names the pyfunc. Never imported by freezeflow itself; everything it needs is in integrations.serving."""

import mlflow

from freezeflow.integrations.serving import ServedModel

mlflow.models.set_model(ServedModel())
