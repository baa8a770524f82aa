# Locates the onnxruntime C/C++ API headers; the library needs nothing else from onnxruntime (it
# does not link against it: RegisterCustomOps receives the API table from the runtime that loads it).
#
# Either the user names a directory holding onnxruntime_cxx_api.h (-DORT_INCLUDE_DIR=... or the
# ORT_INCLUDE_DIR environment variable), or the headers come from the npm registry: the package
# below ships an onnxruntime framework whose Headers/ folder is the plain C/C++ API (API version 29,
# no older than the onnxruntime 1.31 wheel the project runs on). The 150 MB tarball is checked
# against a pinned sha256, only the headers are kept, and they are cached in SHERRY_ORT_CACHE_DIR (default: the user cache folder)
# so a rebuild or a second build tree does not download again.

set(SHERRY_ORT_NPM_PACKAGE "com.github.asus4.onnxruntime@0.4.9")
set(SHERRY_ORT_NPM_SHA256 "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d")
set(SHERRY_ORT_HEADERS_IN_TARBALL
    "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers")

set(ORT_INCLUDE_DIR "" CACHE PATH "Directory with onnxruntime_cxx_api.h (empty: download the pinned npm package)")
# The user's cache by default, so repeated `pip install .` builds (each in a fresh build tree) download once.
if(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
  set(_sherry_default_cache "$ENV{XDG_CACHE_HOME}/sherry-export/build-deps")
elseif(DEFINED ENV{HOME} AND NOT "$ENV{HOME}" STREQUAL "")
  set(_sherry_default_cache "$ENV{HOME}/.cache/sherry-export/build-deps")
else()
  set(_sherry_default_cache "${CMAKE_BINARY_DIR}/_deps")
endif()
set(SHERRY_ORT_CACHE_DIR "${_sherry_default_cache}" CACHE PATH "Where the downloaded onnxruntime headers are kept")

function(_sherry_check_ort_include dir origin)
  if(NOT EXISTS "${dir}/onnxruntime_cxx_api.h" OR NOT EXISTS "${dir}/onnxruntime_c_api.h")
    message(FATAL_ERROR "${origin}='${dir}' does not contain onnxruntime_c_api.h and onnxruntime_cxx_api.h")
  endif()
endfunction()

function(_sherry_download_ort_headers dest)
  find_program(SHERRY_NPM npm)
  if(NOT SHERRY_NPM)
    message(FATAL_ERROR
      "npm was not found, and it is needed to fetch the onnxruntime headers (${SHERRY_ORT_NPM_PACKAGE}). "
      "Install it (e.g. apt-get install npm), or point -DORT_INCLUDE_DIR (or the ORT_INCLUDE_DIR "
      "environment variable) at a directory holding onnxruntime_cxx_api.h.")
  endif()
  string(RANDOM LENGTH 8 token)
  set(work "${SHERRY_ORT_CACHE_DIR}/.download-${token}")
  file(REMOVE_RECURSE "${work}")
  file(MAKE_DIRECTORY "${work}")
  message(STATUS "Downloading onnxruntime headers: npm pack ${SHERRY_ORT_NPM_PACKAGE}")
  execute_process(
    COMMAND "${SHERRY_NPM}" pack "${SHERRY_ORT_NPM_PACKAGE}" --silent --pack-destination "${work}"
    WORKING_DIRECTORY "${work}"
    RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE error)
  file(GLOB tarballs "${work}/*.tgz")
  list(LENGTH tarballs count)
  if(NOT result EQUAL 0 OR NOT count EQUAL 1)
    file(REMOVE_RECURSE "${work}")
    message(FATAL_ERROR "npm pack ${SHERRY_ORT_NPM_PACKAGE} failed (exit ${result}): ${error}${output}\n"
      "Check access to the npm registry, or pass -DORT_INCLUDE_DIR=<dir with onnxruntime_cxx_api.h>.")
  endif()
  file(SHA256 "${tarballs}" actual)
  if(NOT actual STREQUAL SHERRY_ORT_NPM_SHA256)
    file(REMOVE_RECURSE "${work}")
    message(FATAL_ERROR "Checksum mismatch for ${SHERRY_ORT_NPM_PACKAGE}: expected sha256 "
      "${SHERRY_ORT_NPM_SHA256}, got ${actual}. The download was deleted; refusing to build with "
      "unverified headers (pass -DORT_INCLUDE_DIR=... to use headers you trust).")
  endif()
  file(ARCHIVE_EXTRACT INPUT "${tarballs}" DESTINATION "${work}/x"
       PATTERNS "${SHERRY_ORT_HEADERS_IN_TARBALL}/*.h")
  _sherry_check_ort_include("${work}/x/${SHERRY_ORT_HEADERS_IN_TARBALL}" "the headers extracted from ${SHERRY_ORT_NPM_PACKAGE}")
  file(REMOVE_RECURSE "${dest}")
  get_filename_component(parent "${dest}" DIRECTORY)
  file(MAKE_DIRECTORY "${parent}")
  # Rename last, so an interrupted download never leaves a half-filled cache entry.
  file(RENAME "${work}/x/${SHERRY_ORT_HEADERS_IN_TARBALL}" "${dest}")
  file(REMOVE_RECURSE "${work}")
endfunction()

# Sets `out_var` to the onnxruntime include directory, downloading the headers if needed.
function(sherry_ort_include_dir out_var)
  if(ORT_INCLUDE_DIR)
    _sherry_check_ort_include("${ORT_INCLUDE_DIR}" "ORT_INCLUDE_DIR")
    set(${out_var} "${ORT_INCLUDE_DIR}" PARENT_SCOPE)
    return()
  endif()
  if(DEFINED ENV{ORT_INCLUDE_DIR} AND NOT "$ENV{ORT_INCLUDE_DIR}" STREQUAL "")
    _sherry_check_ort_include("$ENV{ORT_INCLUDE_DIR}" "the ORT_INCLUDE_DIR environment variable")
    set(${out_var} "$ENV{ORT_INCLUDE_DIR}" PARENT_SCOPE)
    return()
  endif()
  # The checksum names the cache entry, so a changed pin never reuses stale headers.
  string(SUBSTRING "${SHERRY_ORT_NPM_SHA256}" 0 16 short_sha)
  set(dest "${SHERRY_ORT_CACHE_DIR}/onnxruntime-headers-${short_sha}")
  if(NOT EXISTS "${dest}/onnxruntime_cxx_api.h")
    _sherry_download_ort_headers("${dest}")
  endif()
  set(${out_var} "${dest}" PARENT_SCOPE)
endfunction()
