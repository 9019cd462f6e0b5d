"""fedmq's cloud services: bundle store, task manager, device registry."""
