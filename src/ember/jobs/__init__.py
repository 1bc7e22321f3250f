"""Durable work: batch files and batches (OpenAI's Files and Batches APIs, `ember batch`, Ray fan-out),
scheduled jobs, and the RabbitMQ worker."""
