"""Base vs fine-tuned: metrics, gates, the verdict, the report and its charts."""
