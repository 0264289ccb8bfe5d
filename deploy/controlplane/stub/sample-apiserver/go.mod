// Not imported by anything built here; stands in for a module the proxy does not serve at this version.
module k8s.io/sample-apiserver

go 1.24.0
