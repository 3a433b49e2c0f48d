"""Running past one machine: the service on Ray Serve (``serve``) and offline detection on Ray Data
(``data_job``). Imports ``model`` and ``service``; Ray is imported only inside the functions that need it
(``pip install 'refinedet[scale]'``)."""
