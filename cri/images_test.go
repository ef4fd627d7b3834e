package cri

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

const testDigest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func idOf(ref string) string {
	sum := sha256.Sum256([]byte(ref))
	return "sha256:" + hex.EncodeToString(sum[:])
}

func TestParseRef(t *testing.T) {
	for _, tc := range []struct {
		in, tag, digest string
		bad             bool
	}{
		{in: "busybox", tag: "docker.io/library/busybox:latest"},
		{in: "busybox:1.36", tag: "docker.io/library/busybox:1.36"},
		{in: "docker.io/library/busybox:1.36", tag: "docker.io/library/busybox:1.36"},
		{in: "localhost:5000/team/app:v2", tag: "localhost:5000/team/app:v2"},
		{in: "busybox@" + testDigest, digest: "docker.io/library/busybox@" + testDigest},
		{in: "busybox:1@" + testDigest, tag: "docker.io/library/busybox:1", digest: "docker.io/library/busybox@" + testDigest},
		{in: "", bad: true},
		{in: "UPPER", bad: true},
		{in: "a b", bad: true},
	} {
		t.Run(tc.in, func(t *testing.T) {
			p, err := parseRef(tc.in)
			if tc.bad {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.tag, p.tag)
			assert.Equal(t, tc.digest, p.digest)
			assert.Equal(t, idOf(p.named.String()), p.id)
		})
	}
}

func TestImages(t *testing.T) {
	e := newEnv(t)
	pull := func(ref string) string {
		t.Helper()
		resp, err := e.img.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: ref}})
		require.NoError(t, err)
		return resp.ImageRef
	}
	status := func(ref string) *runtime.Image {
		t.Helper()
		resp, err := e.img.ImageStatus(ctx, &runtime.ImageStatusRequest{Image: &runtime.ImageSpec{Image: ref}})
		require.NoError(t, err)
		return resp.Image
	}
	busybox := pull("busybox")
	assert.Equal(t, idOf("docker.io/library/busybox:latest"), busybox)
	assert.Equal(t, busybox, pull("docker.io/library/busybox:latest"), "the same image")
	app := pull("localhost:5000/app:v1@" + testDigest)

	for _, tc := range []struct {
		ref  string
		want string
	}{
		{"busybox", busybox},
		{"busybox:latest", busybox},
		{"docker.io/library/busybox", busybox},
		{busybox, busybox},
		{busybox[len("sha256:"):][:12], busybox},
		{"localhost:5000/app@" + testDigest, app},
		{"localhost:5000/app:v1", app},
		{"busybox:other", ""},
		{"sha256:ffff", ""},
		{"", ""},
		{"NOT A REF", ""},
	} {
		t.Run("status "+tc.ref, func(t *testing.T) {
			img := status(tc.ref)
			if tc.want == "" {
				assert.Nil(t, img, "an unknown image is an empty response")
				return
			}
			require.NotNil(t, img)
			assert.Equal(t, tc.want, img.Id)
		})
	}
	img := status("busybox")
	assert.Equal(t, []string{"docker.io/library/busybox:latest"}, img.RepoTags)
	assert.Positive(t, img.Size, "the CRI wants a size (crictl rmi checks it)")
	img = status(app)
	assert.Equal(t, []string{"localhost:5000/app@" + testDigest}, img.RepoDigests)
	assert.Equal(t, []string{"localhost:5000/app:v1"}, img.RepoTags)

	list, err := e.img.ListImages(ctx, &runtime.ListImagesRequest{})
	require.NoError(t, err)
	assert.Len(t, list.Images, 2)
	list, err = e.img.ListImages(ctx, &runtime.ListImagesRequest{Filter: &runtime.ImageFilter{Image: &runtime.ImageSpec{Image: "busybox"}}})
	require.NoError(t, err)
	require.Len(t, list.Images, 1)
	assert.Equal(t, busybox, list.Images[0].Id)

	// A tag moves to the image pulled last.
	moved := pull("localhost:5000/app:v1")
	assert.NotEqual(t, app, moved)
	assert.Equal(t, moved, status("localhost:5000/app:v1").Id)
	assert.Empty(t, status(app).RepoTags, "the old image keeps its digest only")

	_, err = e.img.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: "Bad Ref"}})
	assert.Equal(t, codes.InvalidArgument, code(err))

	// Persisted in <dir>/.images.json, which sandbox recovery ignores.
	_, err = os.Stat(filepath.Join(e.dir, ImagesFile))
	require.NoError(t, err)
	e = e.restart()
	list, err = e.img.ListImages(ctx, &runtime.ListImagesRequest{})
	require.NoError(t, err)
	assert.Len(t, list.Images, 3)
	_, err = os.Stat(filepath.Join(e.dir, ".quarantine"))
	assert.True(t, os.IsNotExist(err), "the image list is not taken for a sandbox")

	for i := 0; i < 2; i++ {
		_, err = e.img.RemoveImage(ctx, &runtime.RemoveImageRequest{Image: &runtime.ImageSpec{Image: "busybox"}})
		require.NoError(t, err, "remove is idempotent")
	}
	assert.Nil(t, status(busybox))

	fs, err := e.img.ImageFsInfo(ctx, &runtime.ImageFsInfoRequest{})
	require.NoError(t, err)
	require.Len(t, fs.ImageFilesystems, 1)
	assert.Equal(t, e.dir, fs.ImageFilesystems[0].FsId.Mountpoint)
	assert.Positive(t, fs.ImageFilesystems[0].UsedBytes.Value)
	assert.Positive(t, fs.ImageFilesystems[0].InodesUsed.Value)
}

func TestContainerImageRef(t *testing.T) {
	e := newEnv(t)
	pulled, err := e.img.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: "nginx:1.27"}})
	require.NoError(t, err)
	podID := e.runp(podConfig("img", nil))
	for _, tc := range []struct {
		name, image, display, id string
	}{
		// The kubelet creates containers with the ID PullImage returned.
		{"by id", pulled.ImageRef, "docker.io/library/nginx:1.27", pulled.ImageRef},
		{"by name", "nginx:1.27", "docker.io/library/nginx:1.27", pulled.ImageRef},
		{"not pulled", "redis", "redis", idOf("docker.io/library/redis:latest")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := containerConfig(tc.name, nil, nil)
			cfg.Image = &runtime.ImageSpec{Image: tc.image, UserSpecifiedImage: "user-said"}
			st := e.status(e.create(podID, cfg))
			assert.Equal(t, tc.display, st.Image.Image)
			assert.Equal(t, "user-said", st.Image.UserSpecifiedImage)
			assert.Equal(t, tc.id, st.ImageRef)
			assert.Equal(t, tc.id, st.ImageId)
		})
	}
}

func TestDamagedImageList(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, ImagesFile), []byte("{not json"), 0o600))
	e := startEnv(t, dir)
	list, err := e.img.ListImages(ctx, &runtime.ListImagesRequest{})
	require.NoError(t, err)
	assert.Empty(t, list.Images)
	matches, _ := filepath.Glob(filepath.Join(dir, ImagesFile+".damaged-*"))
	assert.Len(t, matches, 1, "the damaged list is kept aside")
}
