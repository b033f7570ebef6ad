"""Planning and measuring an analysis (`analyze`, `Analysis`, `AnalyzeOptions`), across processes, and its JSON/CSV."""

from tbdiag._lazy import exports

__all__, __getattr__ = exports(__name__, {
    "analyze": "tbdiag.analysis.core",
    "Analysis": "tbdiag.analysis.core",
    "AnalyzeOptions": "tbdiag.analysis.options",
    "read_analyses": "tbdiag.analysis.export",
    "to_json": "tbdiag.analysis.export",
    "to_csv": "tbdiag.analysis.export",
})
