"""``sbrender serve``: an HTTP front over the queue, torch-free.

Three surfaces over one ``Client`` (file spool or Redis): the FastAPI server
sbrender replaces (``legacy``), AUTOMATIC1111's ``/sdapi/v1`` (``a1111``) and a job
API of our own (``jobsapi``). ``front`` holds what they share (the client, the
shared result watcher, who submitted what); ``guard`` is the security middleware;
``app`` puts them together and ``server`` runs it under uvicorn.
"""
