"""The report's pieces: the HTML page, the plots, and the sweep folders read for the sweep report."""
