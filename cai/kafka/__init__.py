"""The pipeline on Kafka: client settings (`client`), the services' stream stage (`stream`), the
record codec (`records`), topics (`topics`) and operating it from outside (`admin`). The
development broker is not part of it: `cai.devbroker`."""
