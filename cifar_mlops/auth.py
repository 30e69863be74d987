"""What the team server's basic-auth app (MLflow's) asks of a password: read by the command that starts the
server (`server`, which imports no MLflow) and by the one that manages its users (`tracking.team`)."""

MIN_PASSWORD_LENGTH = 12  # the basic-auth app refuses shorter passwords (mlflow.utils.validation._validate_password)
