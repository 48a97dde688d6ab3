"""Results, plots, the HTML report and run folders."""
