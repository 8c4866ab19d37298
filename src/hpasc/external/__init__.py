"""Public Human Protein Atlas images (the organisers' ``kaggle_2021.tsv`` listing) fetched, checked and
written in the competition layout (``hpasc external``)."""
from .download import (
    ExternalError,
    FetchOptions,
    FetchReport,
    fetch_external,
    gunzip_bounded,
    is_complete,
)
from .listing import LOCATION_CLASSES, ListingError, Selection, image_id_from_url, location_classes, read_listing

__all__ = ["ExternalError", "FetchOptions", "FetchReport", "LOCATION_CLASSES", "ListingError", "Selection",
           "fetch_external", "gunzip_bounded", "image_id_from_url", "is_complete", "location_classes",
           "read_listing"]
