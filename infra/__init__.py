"""What the pipeline runs on: volumes, Kafka settings and topics, the embedded broker."""
