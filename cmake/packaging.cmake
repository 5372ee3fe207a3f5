# Debian packages with CPack (`make package`, or `cpack -G DEB` in a
# build tree), one per install component of CMakeLists.txt:
#
#   libcancel<so>           runtime   libcancel.so.<so>
#   libcancel-dev           dev       the core's headers, libcancel.a, the
#                                     libcancel.so link, cancel.pc, the CMake
#                                     package, the man pages
#   libcancel-<name><so>    <name>    libcancel-<name>.so.<so>
#   libcancel-<name>-dev    <name>_dev  cancel/<name>.h, the .a, the .so
#                                     link, cancel-<name>.pc, its CMake
#                                     targets file
#
# <so> is the SOVERSION (0.1 while 0.x, see docs/abi.md): Debian names a
# runtime library package after its SONAME, so that two ABIs can be
# installed side by side (libapt-pkg6.0 does the same).  The core's
# packages depend on no adapted library; an adapter's runtime package
# depends on the core's and on the adapted library's runtime package
# (dpkg-shlibdeps finds it), its -dev package on libcancel-dev and on the
# adapted library's -dev package, since cancel/<name>.h includes that
# library's header.
#
# Expects from CMakeLists.txt: _cancel_adapters, _cancel_soversion,
# _cancel_debian_<name> (the adapted library's Debian -dev package).

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME libcancel)
set(CPACK_PACKAGE_VERSION "${PROJECT_VERSION}")
# Each package's synopsis is the first line of its component's
# description: CPackDeb prepends the project's summary to every one unless
# the summary is CPack's own default, so say that.
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "${CMAKE_PROJECT_NAME} built using CMake")
set(CPACK_PACKAGE_CONTACT "libcancel maintainers <libcancel@example.invalid>")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
# Everything the packages hold lives under the build tree's own directory
# of CPack (and `cpack -B DIR` moves it): the source tree stays clean.
set(CPACK_PACKAGE_DIRECTORY "${PROJECT_BINARY_DIR}/packages")

set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT) # <package>_<version>-<release>_<arch>.deb
set(CPACK_DEBIAN_PACKAGE_RELEASE 1)
set(CPACK_DEBIAN_PACKAGE_SECTION libs)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
# Depends from the libraries' NEEDED entries (libc6, libcurl4, ...), and a
# shlibs file in each runtime package, so that a program built against it
# gets the right Depends in its own package.  Any 0.1.x is ABI compatible
# with 0.1.0 (same SONAME), hence >=.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS_POLICY ">=")
# dpkg-shlibdeps must find libcancel.so.<so>, needed by each adapter, in
# the runtime package being built alongside, not on the system: the Depends
# on it comes from CPACK_COMPONENT_<NAME>_DEPENDS below.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS_PRIVATE_DIRS
    "${PROJECT_BINARY_DIR}")
# Components depend on each other at this very version.
set(CPACK_DEBIAN_ENABLE_COMPONENT_DEPENDS ON)

# Only the components below make packages: a file installed without a
# component ("Unspecified") would otherwise make a package of its own;
# tests/package/run.sh checks that there is none.
set(CPACK_COMPONENTS_ALL runtime dev)

set(CPACK_DEBIAN_RUNTIME_PACKAGE_NAME "libcancel${_cancel_soversion}")
string(CONCAT CPACK_COMPONENT_RUNTIME_DESCRIPTION
    "cooperative cancellation for C services: shared library\n"
    "libcancel gives C services cancellation tokens, cancellable waits,\n"
    "linked sources with deadlines and reasons, and shields.  This package\n"
    "holds the core library, which depends on the C library alone.")

set(CPACK_DEBIAN_DEV_PACKAGE_NAME libcancel-dev)
set(CPACK_DEBIAN_DEV_PACKAGE_SECTION libdevel)
set(CPACK_COMPONENT_DEV_DEPENDS runtime)
string(CONCAT CPACK_COMPONENT_DEV_DESCRIPTION
    "cooperative cancellation for C services: development files\n"
    "Headers, the static library, pkg-config file (cancel), CMake package\n"
    "(find_package(cancel)) and man pages of the libcancel core.  The\n"
    "adapters have their own -dev packages (libcancel-curl-dev, ...).")

foreach(_a ${_cancel_adapters})
  string(TOUPPER "${_a}" _A)
  list(APPEND CPACK_COMPONENTS_ALL ${_a} ${_a}_dev)
  set(CPACK_DEBIAN_${_A}_PACKAGE_NAME "libcancel-${_a}${_cancel_soversion}")
  set(CPACK_COMPONENT_${_A}_DEPENDS runtime)
  set(CPACK_DEBIAN_${_A}_DEV_PACKAGE_NAME "libcancel-${_a}-dev")
  set(CPACK_DEBIAN_${_A}_DEV_PACKAGE_SECTION libdevel)
  set(CPACK_COMPONENT_${_A}_DEV_DEPENDS ${_a} dev)
  if(_cancel_debian_${_a})
    set(_deb "${_cancel_debian_${_a}}")
    if(_deb STREQUAL "libcurl4-openssl-dev")
      # Any of Debian's libcurl -dev packages (openssl, gnutls, nss).
      set(_deb "libcurl4-openssl-dev | libcurl-dev")
    endif()
    set(CPACK_DEBIAN_${_A}_DEV_PACKAGE_DEPENDS "${_deb}")
    set(_what "adapter for ${_cancel_module_${_a}}")
  else()
    set(_what "${_a}, on the core alone")
  endif()
  string(CONCAT CPACK_COMPONENT_${_A}_DESCRIPTION
      "cooperative cancellation for C services: libcancel-${_a}\n"
      "The shared library libcancel-${_a}, the libcancel ${_what}.")
  string(CONCAT CPACK_COMPONENT_${_A}_DEV_DESCRIPTION
      "cooperative cancellation for C services: libcancel-${_a} development files\n"
      "Header, static library, pkg-config file (cancel-${_a}) and CMake\n"
      "targets (find_package(cancel COMPONENTS ${_a})) of libcancel-${_a},\n"
      "the libcancel ${_what}.")
endforeach()
unset(_a)
unset(_A)
unset(_deb)
unset(_what)

include(CPack)
