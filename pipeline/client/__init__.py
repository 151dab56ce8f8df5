"""The client side: ``PipelineClient``, ``AIProviderManager``, report and health readers, replay, control commands.

Imports ``pipeline.assembly`` and below; never the CLI or the endpoint (DESIGN A1).
"""
