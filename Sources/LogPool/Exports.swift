@_exported import LogPoolFormat
